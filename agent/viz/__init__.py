"""`pinion stat`, `edges`, `top` and `check`: read agents' admin endpoints, the way
`linkerd viz stat/edges/top` and `linkerd check` read Linkerd's proxies.

scrape.py does the HTTP, stats.py the arithmetic (no I/O), checks.py decides health,
render.py lays out tables, commands.py wires them to the command line."""
