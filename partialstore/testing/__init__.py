"""Test helpers shipped with partialstore so third-party backends can reuse them."""
