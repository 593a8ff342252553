"""The ceiling for webhook intake: an aiohttp server whose handler reads the body and returns 200."""

from __future__ import annotations

import sys

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=200)


def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/webhooks/insitechat/{chatbot_id}", accept)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(int(sys.argv[1]))
