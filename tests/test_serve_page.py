"""The chat page in a real headless browser (Debian's chromium and chromedriver through selenium,
nothing downloaded): type, watch the reply stream in, stop one mid-stream (its slot frees),
regenerate, clear; text is shown as text, never as HTML. Fails, never skips, without a browser."""

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from scratchllm.checkpoint import load_chat_model
from scratchllm.data.chat import get_template
from scratchllm.serve.app import ServerConfig, ServerThread, create_app
from scratchllm.serve.engine import Engine
from tests.test_chat_cli import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver (.ci/run does it)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # At temperature 0 the reply is 'a' forever (to max tokens): time to press Stop. Sampled,
    # <|end|> comes after a few dozen a's and b's.
    ckpt = make_checkpoint(tmp_path_factory.mktemp("page"), {"a": 6.0, "b": 6.0, "<|end|>": 4.0},
                           context_length=2048)
    model, tok, template = load_chat_model(ckpt, "cpu")
    engine = Engine(model, tok, slots=2)
    step = engine.step
    # At least 2 ms a token: the greedy reply (2000 tokens) is still streaming when the test
    # looks, however fast the machine.
    engine.step = lambda: (step(), time.sleep(0.002))
    with ServerThread(create_app(engine, ServerConfig("tiny", get_template(template)))) as s:
        yield s.url


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            pytest.fail(f"{path} is missing: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,760"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(condition, seconds: float = 30, what: str = "the page"):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


def test_chat_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(server)
    wait(lambda: d.find_element(By.ID, "model").text == "tiny", what="the model name")
    replies = lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")  # noqa: E731
    state = lambda el: el.get_attribute("data-state")  # noqa: E731

    # A message with markup is shown as typed: no element is made from it.
    box = d.find_element(By.ID, "input")
    box.send_keys("<b>hello</b> & <script>window.hacked = 1</script>")
    box.send_keys(Keys.ENTER)
    user = d.find_element(By.CSS_SELECTOR, ".msg.user")
    assert user.text == "<b>hello</b> & <script>window.hacked = 1</script>"
    assert not d.find_elements(By.CSS_SELECTOR, "#messages b, #messages script")
    wait(lambda: state(replies()[0]) == "done", what="the first reply")
    first = replies()[0].text
    assert first and set(first) <= {"a", "b"}

    # Greedy and long: stop it while it streams; the server frees the slot.
    settings = d.find_element(By.ID, "settings")
    settings.find_element(By.TAG_NAME, "summary").click()
    for field, value in (("temperature", "0"), ("max-tokens", "2000")):
        element = d.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    d.find_element(By.ID, "system").send_keys("Only say a.")
    box.send_keys("go on forever", Keys.ENTER)
    wait(lambda: len(replies()) == 2 and len(replies()[1].text) > 30, what="a streaming reply")
    assert state(replies()[1]) == "streaming"
    assert health(server)["active"] == 1
    d.find_element(By.ID, "stop").click()
    wait(lambda: state(replies()[1]) == "stopped", what="the stop")
    stopped = replies()[1].text
    assert stopped.endswith("[stopped]") and set(stopped.removesuffix("[stopped]")) == {"a"}
    assert len(stopped) < 2000
    wait(lambda: health(server)["active"] == 0, 10, "the slot to be freed")
    d.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000
    if shot := os.environ.get("SCRATCHLLM_SCREENSHOT"):  # for docs/serve.md
        shutil.copy(tmp_path / "page.png", shot)

    # Regenerate replaces the last reply (max tokens 3 now: a quick one); Clear empties it all.
    element = d.find_element(By.ID, "max-tokens")
    element.clear()
    element.send_keys("3")
    d.find_element(By.ID, "regenerate").click()
    wait(lambda: len(replies()) == 2 and state(replies()[1]) == "done", what="the new reply")
    assert replies()[1].text == "aaa[length limit]"
    d.find_element(By.ID, "clear").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#messages .msg")
    assert d.execute_script("return window.hacked") is None
