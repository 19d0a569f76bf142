// tokenrelay.js: a small browser client for tokenrelay streams (served at /sdk/tokenrelay.js).
//
//   const relay = new TokenRelay({ baseUrl: "", apiKey: "tr-..." });
//   const stream = relay.chat({ model: "tiny", messages: [{ role: "user", content: "Hi" }] }, {
//     onToken: (text) => ..., onDone: (finishReason) => ..., onError: (error) => ...,
//     signal: controller.signal,   // optional: aborting it stops the stream, as stream.stop() does
//   });
//   const result = await stream.done; // { state: "finished" | "error" | "stopped", finishReason, text, error, resumes }
//   stream.stop();   // cancels the generation on the server
//
// Streams are Chat Completions over fetch (so the API key goes in a header). A connection that drops
// before the end is resumed by itself: GET /v1/streams/{id} with Last-Event-ID, continuing after the last
// event received, so the text has nothing missing and nothing twice. For the resume endpoint alone an
// EventSource also works (it sends Last-Event-ID on its own): relay.follow(id, after, handlers), which
// reports a refused resume (an unknown or expired stream) through onError too.

export class TokenRelay {
  constructor({ baseUrl = "", apiKey = "", maxResumes = 5 } = {}) {
    this.baseUrl = baseUrl;
    this.apiKey = apiKey;
    this.maxResumes = maxResumes;
  }

  headers(extra = {}) {
    const h = { ...extra };
    if (this.apiKey) h.authorization = `Bearer ${this.apiKey}`;
    return h;
  }

  chat(body, handlers = {}) {
    return new ChatStream(this, body, handlers);
  }

  // Follow a stream with EventSource (no API key header possible: for open gateways or same-origin cookies).
  follow(streamId, after, { onToken, onDone, onError } = {}) {
    const source = new EventSource(`${this.baseUrl}/v1/streams/${streamId}?after=${after}`);
    let ended = false;
    const end = () => { ended = true; source.close(); };
    source.onmessage = (msg) => {
      if (msg.data === "[DONE]") { end(); return; }
      const chunk = JSON.parse(msg.data);
      if (chunk.error) { end(); onError?.(chunk.error); return; }
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) onToken?.(choice.delta.content);
      if (choice?.finish_reason) onDone?.(choice.finish_reason);
    };
    // A dropped connection leaves the source CONNECTING (it reconnects with Last-Event-ID by itself); a
    // refused request (404: unknown, expired or someone else's stream) closes it, and EventSource cannot
    // see the status, so that is the error reported.
    source.addEventListener("error", () => {
      if (!ended && source.readyState === EventSource.CLOSED) {
        ended = true;
        onError?.({ type: "stream_not_found", message: `GET /v1/streams/${streamId} was refused` });
      }
    });
    return source;
  }
}

class ChatStream {
  constructor(relay, body, handlers) {
    this.relay = relay;
    this.handlers = handlers;
    this.id = null;
    this.events = 0; // content events received: where a resume continues from
    this.resumes = 0;
    this.finished = false;
    this.stopped = false;
    this.controller = null;
    this.text = "";
    this.finishReason = null;
    this.error = null;
    handlers.signal?.addEventListener("abort", () => this.stop());
    this.done = this.run({
      ...body,
      stream: true,
      // the model goes on when the connection drops, so the resume gets everything
      stream_options: { ...(body.stream_options || {}), on_disconnect: "continue" },
    });
  }

  // Cancel the generation (the server stops the model) and end this stream.
  async stop() {
    this.stopped = true;
    this.controller?.abort();
    if (this.id) {
      await fetch(`${this.relay.baseUrl}/v1/streams/${this.id}`, {
        method: "DELETE", headers: this.relay.headers(),
      }).catch(() => {});
    }
  }

  // Drop the connection as a network failure would (for testing resume): the stream resumes by itself.
  dropConnection() {
    this.controller?.abort();
  }

  // What stream.done resolves to.
  result() {
    const state = this.error ? "error" : this.finishReason ? "finished" : this.stopped ? "stopped" : "error";
    return {
      state, finishReason: this.finishReason, text: this.text, error: this.error, resumes: this.resumes, id: this.id,
    };
  }

  fail(error) {
    this.error = error;
    this.handlers.onError?.(error);
  }

  async run(body) {
    await this.stream(body);
    return this.result();
  }

  async stream(body) {
    const relay = this.relay;
    let response = await this.open(`${relay.baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: relay.headers({ "content-type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!response) return;
    this.id = response.headers.get("x-stream-id");
    this.handlers.onStart?.(this.id, response.headers.get("x-tokenrelay-deployment"));
    while (!this.finished && !this.stopped) {
      const dropped = await this.read(response);
      if (!dropped || this.finished || this.stopped) break;
      if (this.resumes >= relay.maxResumes) {
        this.fail({ type: "resume_failed", message: "the connection kept dropping" });
        break;
      }
      this.resumes += 1;
      this.handlers.onResume?.(this.events);
      await new Promise((r) => setTimeout(r, 100 * this.resumes));
      response = await this.open(`${relay.baseUrl}/v1/streams/${this.id}`, {
        headers: relay.headers({ "last-event-id": String(this.events) }),
      });
      if (!response) break;
    }
  }

  async open(url, init) {
    this.controller = new AbortController();
    try {
      const response = await fetch(url, { ...init, signal: this.controller.signal });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        this.fail(body.error || { type: "http_error", message: `HTTP ${response.status}` });
        return null;
      }
      return response;
    } catch (err) {
      if (!this.stopped) this.fail({ type: "network_error", message: String(err) });
      return null;
    }
  }

  // Read SSE until the end; returns true when the connection dropped before it.
  async read(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return !this.finished;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          this.event(block);
        }
      }
    } catch (err) {
      return !this.stopped && !this.finished;
    }
  }

  event(block) {
    let data = "";
    let id = null;
    for (const line of block.split("\n")) {
      if (line.startsWith("data: ")) data += line.slice(6);
      else if (line.startsWith("id: ")) id = Number(line.slice(4));
    }
    if (!data) return; // a keep-alive comment
    if (data === "[DONE]") { this.finished = true; return; }
    const chunk = JSON.parse(data);
    if (chunk.error) {
      this.finished = true;
      this.fail(chunk.error);
      return;
    }
    const choice = chunk.choices?.[0];
    if (!choice) return;
    const delta = choice.delta || {};
    if (id !== null) this.events = id; // the resume endpoint numbers its events
    else if (delta.content || delta.tool_calls || delta.reasoning_content) this.events += 1;
    if (delta.content) {
      this.text += delta.content;
      this.handlers.onToken?.(delta.content);
    }
    if (choice.finish_reason && !this.finishReason) {
      this.finishReason = choice.finish_reason;
      this.handlers.onDone?.(choice.finish_reason);
    }
  }
}

if (typeof window !== "undefined") window.TokenRelay = TokenRelay;
