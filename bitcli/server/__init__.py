"""`bit serve`: the model behind an HTTP JSON API on uvicorn (the `serve` extra). app.py is the API (routes,
one request from body to rows), batcher.py the model thread that lets concurrent requests share forward
passes, bodies.py the request bodies (size cap, multipart), listen.py the socket, uvicorn and the shutdown,
page.html the upload page served at `/`."""
