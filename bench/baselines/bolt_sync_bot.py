"""The common minimal bot: a synchronous slack-bolt App, one plain HTTP call to InsiteChat per mention."""

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from wsgiref.simple_server import make_server

from slack_bolt import App
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient

THREADS = os.environ.get("LISTENER_THREADS")  # unset: Bolt's default pool of 5 listener threads
app = App(
    signing_secret=os.environ["SLACK_SIGNING_SECRET"],
    client=WebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ.get("SLACK_API_URL", "https://slack.com/api/")),
    listener_executor=ThreadPoolExecutor(max_workers=int(THREADS)) if THREADS else None,
)
CHAT_URL = f"{os.environ['INSITECHAT_BASE_URL']}/v1/chatbots/{os.environ['INSITECHAT_CHATBOT_ID']}/chat"


@app.event("app_mention")
def answer(event: dict, say) -> None:  # type: ignore[no-untyped-def]
    thread = event.get("thread_ts") or event["ts"]
    question = event["text"].split(">", 1)[-1].strip()
    request = urllib.request.Request(
        CHAT_URL,
        data=json.dumps({"message": question, "session_id": thread}).encode(),
        headers={"Authorization": f"Bearer {os.environ['INSITECHAT_API_KEY']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.load(response)["response"]
    say(text=reply, thread_ts=thread)


@app.event("message")
def ignore(event: dict) -> None:  # the `message` twin of each mention: acked, nothing to do (Bolt's usual advice)
    pass


if __name__ == "__main__":
    if os.environ.get("SLACK_APP_TOKEN"):
        SocketModeHandler(app, os.environ["SLACK_APP_TOKEN"]).start()
    else:
        # app.start(port=3000) is the usual last line; it binds 0.0.0.0, so the same single-threaded
        # http.server-based server is started here on loopback only.
        make_server("127.0.0.1", int(os.environ.get("PORT", "3000")), SlackRequestHandler(app)).serve_forever()
