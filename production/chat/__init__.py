"""The chat format: how a conversation becomes a prompt and generated token ids become an
answer, for the two formats whetstone serves.

- plain: the tokenizer's own chat template, tool calls in the hermes convention
  (``<tool_call>{...}</tool_call>`` in the answer text), generation stopping at end-of-turn;
- harmony (GPT-OSS): channels (analysis, commentary, final), tool calls as commentary
  messages to ``functions.NAME``, control tokens parsed as tokens.

`formats.chat_format(name, tokenizer)` gives the one object the rest of the worker asks:
stop ids, a stream decoder, the tool parser, the template's arguments, and the shape a
grammar-constrained answer wraps around (`shapes`; production.decode.answer_grammar builds the
grammar from it). `output.OutputProcessor` turns generated ids into what the client sees.

Torch-free by contract (pyproject's import-linter): nothing here imports torch, transformers,
xgrammar or the rest of the ML stack, so the API's request handling and its tests can use it
without them. A tokenizer is typed `Any` for that reason.
"""
