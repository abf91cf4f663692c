"""Any OpenAI-compatible chat server through the official `openai` client.

The client's own retries are off: the runner retries, so that every attempt
is counted, Retry-After is honoured across all requests, and a request that
keeps failing is recorded instead of raised.
"""

from __future__ import annotations

import itertools
import json
import os

from alambic.errors import ConfigError
from alambic.generate.backends.base import (
    FatalTeacherError,
    RejectedRequestError,
    TeacherReply,
    TeacherRequest,
    TransientTeacherError,
    UnreachableTeacherError,
)
from alambic.generate.config import ENV_NAME, TeacherBackendConfig
from alambic.generate.retry import parse_retry_after

# Local servers (vLLM, llama.cpp, transformers serve) accept any key but the client insists on one.
PLACEHOLDER_KEY = "no-key-configured"
CONNECT_FAILURES = {"ConnectError", "ConnectTimeout"}
CONNECTIONS_PER_POOL = 16


def read_api_key(api_key_env: str | None) -> str | None:
    """The key from the environment variable named in the config; None when no variable is named."""
    if api_key_env is None:
        return None
    if not ENV_NAME.fullmatch(api_key_env):
        # Never echo the value: a key pasted here instead of a variable name must not reach a log.
        raise ConfigError(
            "teacher.api_key_env must be the NAME of an environment variable (letters, digits, _), "
            "not the key itself; the value given is not shown",
            "export OPENAI_API_KEY=... in the shell and write `api_key_env: OPENAI_API_KEY` in the config",
        )
    key = os.environ.get(api_key_env)
    if not key:
        raise ConfigError(
            f"the environment variable {api_key_env} (teacher.api_key_env) is not set or empty",
            f"export {api_key_env}=<your key> before running, or drop api_key_env for a local server without keys",
        )
    return key


class OpenAITeacher:
    name = "openai"
    batch_size = 1

    def __init__(self, config: TeacherBackendConfig, api_key: str | None):
        try:
            import openai
        except ImportError:
            raise ConfigError("the openai backend needs the `openai` package",
                              "pip install 'alambic[api]'") from None
        self._openai = openai
        self.config = config
        self.max_in_flight = config.max_in_flight
        self.url = config.base_url.rstrip("/")
        # The HTTP pool scans all its connections for every request; several small pools keep that
        # scan short at high concurrency (it dominated the client's cost at 64 in flight). They share
        # one TLS context: building one reads the CA bundle, ~0.2 s each.
        http = _http_module()
        tls = http.create_ssl_context()
        self.clients = [
            openai.AsyncOpenAI(
                base_url=self.url,
                api_key=api_key or PLACEHOLDER_KEY,
                max_retries=0,
                timeout=config.timeout_s,
                http_client=openai.DefaultAsyncHttpxClient(
                    verify=tls, limits=http.Limits(max_connections=config.max_in_flight,
                                                   max_keepalive_connections=config.max_in_flight)),
            )
            for _ in range(-(-config.max_in_flight // CONNECTIONS_PER_POOL))
        ]
        self._next_client = itertools.cycle(self.clients)
        self._response_type = http.Response

    async def complete(self, batch: list[TeacherRequest], params: dict) -> list[TeacherReply]:
        (request,) = batch
        client = next(self._next_client)
        payload = {"model": self.config.model, "messages": list(request.messages),
                   **self._request_fields(request, params)}
        try:
            # The client's documented raw `post`: same auth, timeouts and errors as `chat.completions.create`,
            # without the typed request and response objects, which cost more than everything else we do.
            response = await client.post("/chat/completions", cast_to=self._response_type, body=payload)
            body = json.loads(response.content)
        except self._openai.APIStatusError as err:
            raise self._status_error(err) from None
        except self._openai.APITimeoutError:
            raise TransientTeacherError("timeout", f"no answer within {self.config.timeout_s:g} s") from None
        except self._openai.APIConnectionError as err:
            cause = type(err.__cause__).__name__
            if cause in CONNECT_FAILURES:
                raise UnreachableTeacherError(f"cannot connect to {self.url} ({cause})", self.url) from None
            raise TransientTeacherError("connection", f"connection broke off ({cause})") from None
        except (ValueError, self._openai.APIResponseValidationError) as err:
            # The body was not valid JSON, or not a chat completion: the answer is lost, ask again.
            raise TransientTeacherError("invalid_response", f"malformed response: {type(err).__name__}") from None
        return [_reply_from(body)]

    def _request_fields(self, request: TeacherRequest, params: dict) -> dict:
        fields = {"temperature": params["temperature"], "top_p": params["top_p"], "max_tokens": params["max_tokens"]}
        if params["stop"]:
            fields["stop"] = params["stop"]
        if request.seed is not None:
            fields["seed"] = request.seed
        if params["logprobs"]:
            fields["logprobs"] = True
            if params["top_logprobs"]:
                fields["top_logprobs"] = params["top_logprobs"]
        fields.update(self.config.extra_body)
        return fields

    def _status_error(self, err) -> Exception:
        status = err.status_code
        detail = _error_detail(err)
        if status in (401, 403):
            return FatalTeacherError(
                f"the server at {self.url} refused the API key (HTTP {status}): {detail}",
                "check the key in the variable named by teacher.api_key_env and its permissions",
            )
        if status == 404:
            return FatalTeacherError(
                f"the server at {self.url} answered 404 for model {self.config.model!r}: {detail}",
                "check teacher.model and teacher.base_url (it usually ends in /v1)",
            )
        if status in (408, 409, 429) or status >= 500:
            kind = "rate_limited" if status == 429 else "timeout" if status == 408 else "server_error"
            return TransientTeacherError(kind, f"HTTP {status}: {detail}", parse_retry_after(err.response.headers))
        return RejectedRequestError(f"http_{status}", f"HTTP {status}: {detail}")

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()


def _http_module():
    """The HTTP library the installed openai client is built on (httpx2 from openai 3, httpx before)."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx



def _error_detail(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
        if message:
            return str(message)[:300]
    return str(getattr(err, "message", err))[:300]


def _reply_from(body) -> TeacherReply:
    choices = body.get("choices") if isinstance(body, dict) else None
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise TransientTeacherError("invalid_response", "the response holds no choice with a message")
    usage = body.get("usage") or {}
    return TeacherReply(
        content=message.get("content") or "",
        finish_reason=choices[0].get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        logprobs=_token_logprobs(choices[0]),
        model=body.get("model"),
    )


def _token_logprobs(choice: dict) -> list[dict] | None:
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return [
        {"token": item.get("token"), "logprob": item.get("logprob"),
         "top": [{"token": alt.get("token"), "logprob": alt.get("logprob")} for alt in item.get("top_logprobs") or []]}
        for item in content
    ]
