"""The tool-call parsers' names, apart from the parsers: the command line offers them
without importing the server."""

PARSER_NAMES = ("hermes", "llama3_json", "mistral", "qwen3_coder")
