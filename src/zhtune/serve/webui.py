"""`zhtune webui`: a Gradio chat page over the inference engine (streaming, multi-turn, system prompt,
generation sliders, stop and clear buttons; Chinese labels with English alongside).

    zhtune webui --model out/sft_run --port 7860          # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import sys
import time

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import GenParams, PromptTooLong

TITLE = "zhtune 对话 Chat"


def _text(content) -> str:
    """A chatbot message's content as text (Gradio gives a str, or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return "" if content is None else str(content)


def to_messages(history: list, system: str) -> list[dict]:
    """Chatbot history (+ system prompt) -> engine messages (user/assistant alternating)."""
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": _text(content)})
    return messages


def respond_fn(engine, update_every: float = 0.05, sessions: dict | None = None):
    """The streaming event handler: (message, history, system, sliders...) -> ("", history) updates.

    Deltas are gathered for `update_every` seconds per page update: a browser re-rendering the
    chat (markdown) on every token falls behind a fast model and stops answering clicks.
    `sessions[session_hash]` holds the Stop / Clear flags the buttons set (Gradio's own `cancels=`
    marks the chat "Error" in Gradio 6, so we stop the stream ourselves and keep the partial answer)."""
    import gradio as gr

    sessions = {} if sessions is None else sessions

    def respond(message, history, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                request=None):
        message = (message or "").strip()
        history = list(history or [])
        if not message:
            yield "", history
            return
        try:
            params = GenParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                               top_p=float(top_p), top_k=int(top_k),
                               repetition_penalty=float(repetition_penalty)).validate()
        except ZhtuneError as exc:
            raise gr.Error(exc.render()) from None
        flags = sessions[getattr(request, "session_hash", None)] = {"stop": False, "clear": False}
        messages = to_messages(history, system) + [{"role": "user", "content": message}]
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield "", history
        stream = _open(engine, messages, params)
        answer, shown, last = "", "", time.monotonic()
        try:
            for delta in stream:
                if flags["clear"]:
                    return
                if flags["stop"]:
                    break
                answer += delta.text
                if answer != shown and (delta.finish_reason or time.monotonic() - last >= update_every):
                    history[-1] = {"role": "assistant", "content": answer}
                    shown, last = answer, time.monotonic()
                    yield "", history
        finally:   # Stop, Clear, or a closed page: cancel the generation in the engine
            stream.close()
        if answer != shown:
            history[-1] = {"role": "assistant", "content": answer}
            yield "", history

    respond.__annotations__["request"] = gr.Request   # Gradio passes the request (session) by type
    return respond


def _flag(sessions: dict, name: str):
    def set_flag(request=None):
        flags = sessions.get(getattr(request, "session_hash", None))
        if flags is not None:
            flags[name] = True

    import gradio as gr

    set_flag.__annotations__["request"] = gr.Request
    return set_flag


def _open(engine, messages: list[dict], params: GenParams):
    """engine.stream, dropping the oldest turns while the conversation is longer than the context."""
    import gradio as gr

    while True:
        try:
            return engine.stream(messages, params)
        except PromptTooLong as exc:
            first = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                raise gr.Error(exc.render()) from None
            del messages[first:first + 2]
        except ZhtuneError as exc:
            raise gr.Error(exc.render()) from None


def build_app(engine, system: str | None = None, defaults: GenParams | None = None,
              update_every: float = 0.05):
    """The Gradio Blocks app for `engine` (not launched)."""
    import gradio as gr

    from zhtune.infer.options import gen_defaults

    d = defaults or gen_defaults("webui")   # the sliders start where `zhtune webui`'s flags do
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE}\n模型 model: `{engine.model_name}` · 后端 backend: {engine.backend} · "
                    f"模板 template: {engine.template.name}")
        chatbot = gr.Chatbot(label="对话 Conversation", height=460, elem_id="zhtune-chatbot")
        with gr.Row():
            message = gr.Textbox(label="输入 Message", placeholder="输入问题，回车发送 · Type a message, Enter to send",
                                 scale=8, elem_id="zhtune-message")
            send = gr.Button("发送 Send", variant="primary", scale=1, elem_id="zhtune-send")
            stop = gr.Button("停止 Stop", variant="stop", scale=1, elem_id="zhtune-stop")
            clear = gr.Button("清空 Clear", scale=1, elem_id="zhtune-clear")
        with gr.Accordion("生成设置 Generation settings", open=False):
            system_box = gr.Textbox(label="系统提示 System prompt", value=system or engine.template.default_system,
                                    lines=2, elem_id="zhtune-system")
            limit = max(16, min(4096, engine.max_model_len or 4096))
            sliders = [
                gr.Slider(1, limit, value=min(d.max_new_tokens, limit), step=1, label="最大生成长度 Max new tokens"),
                gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="温度 Temperature (0 = greedy)"),
                gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p 核采样 nucleus"),
                gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k (0 = off)"),
                gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.05, label="重复惩罚 Repetition penalty"),
            ]
        inputs = [message, chatbot, system_box, *sliders]
        sessions: dict = {}
        respond = respond_fn(engine, update_every, sessions)
        message.submit(respond, inputs, [message, chatbot], api_name="chat", concurrency_limit=16)
        send.click(respond, inputs, [message, chatbot], api_name=False, concurrency_limit=16)
        stop.click(_flag(sessions, "stop"), None, None, queue=False, api_name=False)
        clear.click(_flag(sessions, "clear"), None, None, queue=False, api_name=False).then(
            lambda: ("", []), None, [message, chatbot], queue=False, api_name=False)
    return app


def build_parser():
    from zhtune.args import bounded_int, make_parser
    from zhtune.infer.options import add_gen_args, add_model_args

    p = make_parser("webui", """
        网页对话 (Gradio)：流式输出、多轮历史、系统提示、生成参数、停止与清空。
        A Gradio chat page over the engine: streaming, multi-turn history, system prompt box, generation
        sliders, stop and clear buttons. Binds 127.0.0.1 unless --host says otherwise.""", """
        zhtune webui --model out/sft_run
        zhtune webui --model model.q4_k_m.gguf --port 8080
        zhtune webui --model base_model --lora out/sft/sft_lora_model --host 0.0.0.0 --share""")
    add_model_args(p)
    p.add_argument("--system", default=None, help="系统提示 default system prompt")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it on the network)")
    p.add_argument("--port", type=bounded_int("--port", 1, 65535), default=7860)
    p.add_argument("--share", action="store_true", help="Gradio 公网分享链接 a public gradio.live link")
    add_gen_args(p, "webui")
    return p


def main(argv: list[str]) -> int:
    from zhtune.infer.options import engine_from_args, params_from_args

    from zhtune.serve.runner import check_port_free

    args = build_parser().parse_args(argv)
    defaults = params_from_args(args, "webui")
    check_port_free(args.host, args.port)  # a busy port is named before gradio and the model load
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ZhtuneError("zhtune webui needs gradio", hint="pip install 'zhtune[webui]'") from None
    print(f"加载模型 loading {args.model} ...", file=sys.stderr, flush=True)
    with engine_from_args(args) as engine:
        app = build_app(engine, args.system, defaults)
        try:
            # quiet: gradio's own banner points at launch(share=True), a Python API; ours names --share
            app.queue(default_concurrency_limit=16).launch(server_name=args.host, server_port=args.port,
                                                           share=args.share, show_error=True, quiet=True,
                                                           prevent_thread_lock=True)
        except OSError as exc:
            raise ZhtuneError(f"cannot listen on {args.host}:{args.port}: {exc}", where="--port",
                              hint="choose a free port with --port") from None
        public = f" · 公网 public: {app.share_url}" if app.share_url else " (--share: a public link)"
        print(f"zhtune webui: {app.local_url}{public} — 网页对话已启动 / serving; Ctrl-C 停止 / to stop",
              file=sys.stderr, flush=True)
        app.block_thread()
    return 0
