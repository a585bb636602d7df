"""Drop-in modules built on thrifty ops."""
