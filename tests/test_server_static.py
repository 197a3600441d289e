"""The static files behind the chat page (`/`, `/static/…`): served with their types, nothing outside the
folder (encoded traversal, absolute paths, backslashes, files not shipped), no browser needed; the page
itself in a browser is tests/test_web_ui.py."""
import re
from pathlib import Path

from server_helpers import live_server

STATIC = Path(__file__).resolve().parents[1] / "deltarun" / "server" / "static"


def test_static_routes(chat_ckpt):
    import httpx

    live = live_server(chat_ckpt, api_key="sekret")
    assert httpx.get(live.url + "/").text == "deltarun is running"  # API clients probing `/` see no page
    r = httpx.get(live.url + "/", headers={"Accept": "text/html"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "app.js" in r.text
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        r = httpx.get(f"{live.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert r.content == (STATIC / name).read_bytes()
    assert httpx.get(live.url + "/static/nope.js").status_code == 404
    assert httpx.get(live.url + "/static/..%2Fapp.py").status_code == 404
    for bad in ["vendor/%2e%2e/%2e%2e/app.py", "vendor/katex/..%2F..%2F..%2Fapp.py", "vendor//katex/katex.min.js",
                "vendor/katex/LICENSE.txt", "%2Fetc%2Fpasswd", "vendor\\katex\\katex.min.js"]:
        assert httpx.get(f"{live.url}/static/{bad}").status_code == 404, bad
    r = httpx.get(live.url + "/static/vendor/katex/fonts/KaTeX_Main-Regular.woff2")
    assert r.status_code == 200 and r.headers["content-type"] == "font/woff2"
    for name in ["katex.min.js", "katex.min.css"]:
        assert httpx.get(f"{live.url}/static/vendor/katex/{name}").status_code == 200
    css = (STATIC / "vendor" / "katex" / "katex.min.css").read_text()
    fonts = {p.name for p in (STATIC / "vendor" / "katex" / "fonts").iterdir()}
    assert set(re.findall(r"url\(fonts/([^)]+)\)", css)) == fonts  # only woff2, every one shipped
    assert httpx.get(live.url + "/v1/models").status_code == 401  # the API itself stays protected
    text = "".join((STATIC / n).read_text() for n in ("index.html", "app.js", "style.css"))
    assert "//cdn" not in text and 'src="http' not in text and "@import" not in text  # nothing from the net
