"""The Intuit OAuth client and its strict parsing of Intuit's answers."""
