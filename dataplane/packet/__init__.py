"""Wire codecs: parse_* / build_* pairs over bytes. Standard library only."""
