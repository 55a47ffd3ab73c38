"""A WSGI app behind a Castellan sidecar: answers every request with the CGI-style header
variables it received (HTTP_*), as WSGI servers fold header names (`X_Castellan_User` and
`X-Castellan-User` both become HTTP_X_CASTELLAN_USER), and how many requests reached it before
this one (`calls`: a refused request must never reach the app). Prints its port, then serves."""
import json
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server


CALLS = [0]


def app(environ, start_response):
    calls = CALLS[0]
    CALLS[0] += 1
    body = json.dumps(
        {
            "calls": calls,
            "method": environ["REQUEST_METHOD"],
            "path": environ.get("PATH_INFO", ""),
            "query": environ.get("QUERY_STRING", ""),
            "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(server.server_address[1], flush=True)
server.serve_forever()
