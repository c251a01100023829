"""`pinion dashboard`: a web page on 127.0.0.1 (default port 50750) over the agents."""
