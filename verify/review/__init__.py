"""`faceverify review`: a local web app over the library index and the gallery, to confirm and reject
the matcher's answers face by face (verify.identity.decisions stores and applies them).

app.py builds the Starlette app (routes, token check, decisions by POST); pages.py renders its
server-side HTML and the small keyboard script; server.py binds a port and runs uvicorn."""
