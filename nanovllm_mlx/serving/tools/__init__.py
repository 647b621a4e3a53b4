"""Tool calling: parsers that find a model's tool calls in its output text (one module per
format), the choice of parser from the chat template, and the llguidance grammar that makes
`tool_choice` "required" or a named function a guarantee."""
