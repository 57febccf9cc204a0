"""The aiohttp applications: the private token API, its OpenAPI document, the public callback."""
