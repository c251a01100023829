"""Sans-IO logic: no asyncio, socket, ssl or subprocess imports below this package."""
