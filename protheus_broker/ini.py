"""The TOTVS ini dialect: lexer, typed section access and :class:`ConfigError`.

TOTVS files use ``;`` comments (configobj only knows ``#``), mixed-case keys and sections, and are
often saved by Windows editors (cp1252 or UTF-16).  :func:`_normalise` rewrites each line so that
configobj can read it while keeping the line numbers, so every error names file, line and key.
Each component reads its own sections with :class:`Section`; this module imports nothing of ours.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from configobj import ConfigObj, ConfigObjError, DuplicateError  # type: ignore[import-untyped]


class ConfigError(Exception):
    """A config problem that stops startup: one line naming file, line, key and what is wrong."""

    def __init__(self, path: str, message: str, line: int | None = None, key: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = f"{self.key}: {self.message}" if self.key else self.message
        return f"{where}: {what}"


_SECTION_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*$")


_KEY_RE = re.compile(r"^\s*([^=\s][^=]*?)\s*=(.*)$")


_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?$")


#: Control characters that never appear in a text ini (tab is fine; CR is the Windows line end).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f\x80-\x9f\u2028\u2029]")


def valid_host(host: str) -> bool:
    """True for an IPv4 or IPv6 address (IPv6 with or without brackets) or a DNS host name."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            return False
    if ":" in host or host.replace(".", "").isdigit():
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    return all(_LABEL_RE.match(label) for label in name.split("."))


def _strip_comment(line: str) -> str:
    """Drop a ``;`` or ``#`` comment that is not inside double quotes."""
    in_quotes = False
    for index, char in enumerate(line):
        if char == '"':
            in_quotes = not in_quotes
        elif char in ";#" and not in_quotes:
            return line[:index]
    return line


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


@dataclass
class Located:
    """Where each (section, key) came from, for error messages."""

    lines: dict[tuple[str, str], int] = field(default_factory=dict)
    sections: dict[str, int] = field(default_factory=dict)


def _lines(text: str) -> list[str]:
    """The file's lines as an editor numbers them: split at LF (a CR before it is the Windows line
    end), not at the other characters ``str.splitlines`` also breaks on (form feed, U+0085, ...),
    so every line number we report is the one the user sees.  A trailing Ctrl-Z (the DOS end of
    file some Windows tools still write) is dropped."""
    text = text.rstrip("\x1a")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _normalise(text: str, path: str = "<config>") -> tuple[list[str], Located]:
    """Rewrite each line for configobj: comments gone, names upper-cased, values quoted safely.

    A control character (binary data, a file that is not text) is a :class:`ConfigError` naming
    its line and column."""
    out: list[str] = []
    where = Located()
    section = ""
    for number, raw in enumerate(_lines(text), start=1):
        bad = _CONTROL_RE.search(raw)
        if bad is not None:
            raise ConfigError(path, f"unreadable text: control character {bad.group()!r} at column "
                                    f"{bad.start() + 1}; this is not an ini text file", line=number)
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            out.append("")
            continue
        match = _SECTION_RE.match(line)
        if match:
            section = match.group(1).upper()
            where.sections.setdefault(section, number)
            out.append(f"[{section}]")
            continue
        match = _KEY_RE.match(line)
        if match:
            key = match.group(1).strip().upper()
            value = _unquote(match.group(2))
            where.lines.setdefault((section, key), number)
            # configobj would read quotes, commas and '#' itself: hand it a value it keeps verbatim.
            out.append(f"{key} = '''{value}'''" if value else f"{key} = ''")
            continue
        raise ConfigError(path, f"expected 'KEY = value' or '[SECTION]', got {raw.strip()!r}", line=number)
    return out, where


def decode_text(path: str, data: bytes) -> str:
    """Decode UTF-8 (with or without BOM), UTF-16 with BOM, or Windows cp1252 text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ConfigError(path, f"unreadable text: bad UTF-16 ({exc.reason})") from None
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise ConfigError(path, "unreadable text: a NUL byte; this is not an ini text file", line=line)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


_TRUE = {"1", "TRUE", "YES", "ON"}


_FALSE = {"0", "FALSE", "NO", "OFF"}


class Section:
    """Typed access to one section's values; every error names the key and its line."""

    def __init__(self, path: str, name: str, values: dict[str, str], where: Located):
        self.path = path
        self.name = name
        self.values = values
        self.where = where
        self.used: set[str] = set()

    def line(self, key: str) -> int | None:
        return self.where.lines.get((self.name, key))

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, message, line=self.line(key), key=key)

    def raw(self, key: str) -> str | None:
        self.used.add(key)
        value = self.values.get(key)
        return None if value is None else value.strip()

    def text(self, key: str, default: str) -> str:
        value = self.raw(key)
        return default if value in (None, "") else value  # type: ignore[return-value]

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value in (None, ""):
            return default
        upper = value.upper()  # type: ignore[union-attr]
        if upper in _TRUE:
            return True
        if upper in _FALSE:
            return False
        raise self.error(key, f"expected 1 or 0, got {value!r}")

    def number(self, key: str, default: float, minimum: float, maximum: float) -> float:
        value = self.raw(key)
        if value in (None, ""):
            return default
        try:
            result = float(value)  # type: ignore[arg-type]
        except ValueError:
            raise self.error(key, f"expected a number, got {value!r}") from None
        if not minimum <= result <= maximum:
            raise self.error(key, f"{value} is out of range ({minimum:g} to {maximum:g})")
        return result

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self.raw(key)
        if value in (None, ""):
            return default
        try:
            result = int(value)  # type: ignore[arg-type]
        except ValueError:
            raise self.error(key, f"expected a whole number, got {value!r}") from None
        if not minimum <= result <= maximum:
            raise self.error(key, f"{result} is out of range ({minimum} to {maximum})")
        return result

    def unknown_keys(self) -> list[str]:
        return sorted(k for k in self.values if k not in self.used)


def parse_port(section: Section, key: str, text: str, allow_zero: bool = False) -> int:
    try:
        port = int(text)
    except ValueError:
        raise section.error(key, f"port must be a number, got {text!r}") from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise section.error(key, f"port {port} is out of range ({low} to 65535)")
    return port


def host_and_port(section: Section, key: str) -> tuple[str, int]:
    value = section.raw(key) or ""
    fields = value.split()
    if len(fields) == 1:
        raise section.error(key, f"missing port: expected 'host port', got {value!r}")
    if len(fields) != 2:
        raise section.error(key, f"expected 'host port', got {value!r}")
    host, port_text = fields
    if not valid_host(host):
        raise section.error(key, f"{host!r} is not a host name or IP address")
    host = host.strip("[]")  # [::1] as people write it; connectTCP wants ::1
    return host, parse_port(section, key, port_text)


#: The shortest shared secret we accept: shorter ones are guessable offline from one handshake.
MIN_SECRET_LENGTH = 16


def readable_file(section: Section, key: str, required_because: str | None) -> str | None:
    """The path in *key*, checked readable; missing and *required_because* given: an error."""
    path = section.text(key, "")
    if not path:
        if required_because:
            raise section.error(key, f"is required {required_because}")
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise section.error(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    return path


def writable_file(section: Section, key: str) -> str | None:
    """The log file path in *key*, checked now so that a file the broker cannot write is one line
    at startup (or a refused reload), not a traceback when the log opens."""
    path = section.text(key, "")
    if not path:
        return None
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise section.error(key, f"{path!r} is a directory, not a log file")
    if not os.path.isdir(folder):
        raise section.error(key, f"cannot write {path!r}: folder {folder!r} does not exist")
    if os.path.exists(full):
        if not os.access(full, os.W_OK):
            raise section.error(key, f"cannot write {path!r}: permission denied")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise section.error(key, f"cannot write {path!r}: no permission to create files in {folder!r}")
    return path


def read_secret(section: Section, prefix: str, required_because: str | None) -> bytes | None:
    """``<prefix>SECRET`` (inline) or ``<prefix>SECRET_FILE`` (first line of a file)."""
    inline_key, file_key = f"{prefix}SECRET", f"{prefix}SECRET_FILE"
    inline = section.text(inline_key, "")
    path = readable_file(section, file_key, None)
    if inline and path:
        raise section.error(file_key, f"give {inline_key} or {file_key}, not both")
    if path:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
        secret, key = (lines[0].strip() if lines else b""), file_key
    elif inline:
        secret, key = inline.encode(), inline_key
    else:
        if required_because:
            raise section.error(inline_key, f"{inline_key} or {file_key} is required {required_because}")
        return None
    if len(secret) < MIN_SECRET_LENGTH:
        raise section.error(key, f"the secret is too short ({len(secret)} bytes; at least "
                                 f"{MIN_SECRET_LENGTH})")
    return secret


def read_ini(text: str, path: str) -> tuple[ConfigObj, Located]:
    """configobj over normalised TOTVS text; syntax problems are one-line :class:`ConfigError`s."""
    lines, where = _normalise(text, path)
    try:
        raw = ConfigObj(lines, interpolation=False, list_values=True, encoding=None)
    except DuplicateError as exc:
        key = exc.line.split("=")[0].strip() if "=" in exc.line else exc.line.strip()
        if key.startswith("["):
            first = where.sections.get(key.strip("[]"))
            what = "duplicate section"
        else:
            earlier = [n for (_, k), n in where.lines.items() if k == key and n < exc.line_number]
            first = max(earlier) if earlier else None
            what = "duplicate key"
        also = f" (first at line {first})" if first else ""
        raise ConfigError(path, f"{what}{also}; each may appear once", line=exc.line_number, key=key) from None
    except ConfigObjError as exc:  # every line was checked above: what is left is configobj's word
        first = (getattr(exc, "errors", None) or [exc])[0]
        raise ConfigError(path, str(first).strip() or type(first).__name__,
                          line=getattr(first, "line_number", None)) from None
    return raw, where


def read_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, not an ini file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    return decode_text(path, data)
