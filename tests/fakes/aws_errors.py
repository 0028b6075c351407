"""An AWS endpoint that answers every request with one error, as AWS's JSON protocol does.

For what moto cannot play: credentials that expired, and a policy that denies an action.
STS speaks the query protocol (XML): `sts:GetCallerIdentity`, which the CLI asks first to know
who is at the keyboard, fails the same way when the credentials themselves are bad (expired),
and otherwise names a role session, as for any principal that a policy denies something.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Errors about the credentials themselves: every call fails with them, STS's too.
CREDENTIALS_ERRORS = {"ExpiredTokenException", "ExpiredToken", "InvalidClientTokenId"}
ARN = "arn:aws:sts::123456789012:assumed-role/govuk-admin/alice"


class FailingAws:
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        self.code, self.message, self.status = code, message, status
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = self.rfile.read(length).decode()
                if "Action=GetCallerIdentity" in request:
                    return self._sts()
                outer.requests.append(self.headers.get("X-Amz-Target") or self.path)
                body = json.dumps({"__type": outer.code, "message": outer.message}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-ErrorType", outer.code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _sts(self) -> None:
                outer.requests.append("sts:GetCallerIdentity")
                if outer.code in CREDENTIALS_ERRORS:
                    status = outer.status
                    body = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{outer.code}</Code>"
                            f"<Message>{outer.message}</Message></Error>"
                            "<RequestId>1</RequestId></ErrorResponse>").encode()
                else:
                    status = 200
                    body = (f"<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>{ARN}</Arn>"
                            "<UserId>AROA:alice</UserId><Account>123456789012</Account>"
                            "</GetCallerIdentityResult></GetCallerIdentityResponse>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FailingAws:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
