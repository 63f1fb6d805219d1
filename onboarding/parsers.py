"""Request parsing."""

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, with a nesting bomb (``[[[[…``) a 400 instead of a 500.

    The standard parser only turns ``ValueError`` into a ParseError; ``json`` raises
    ``RecursionError`` for deep nesting.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply")
