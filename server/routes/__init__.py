"""The HTTP routes, one router per concern."""
