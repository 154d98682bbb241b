"""Patterns for the tags of a DSML tool-call block, including the malformed shapes models emit.

The canonical marker is ``｜DSML｜`` (fullwidth bars). The patterns also accept ASCII or doubled
bars and single spaces around the marker, the V3.2 block name ``function_calls``, a missing
underscore (``toolcalls``), and, for invoke and parameter tags, no marker at all. Tags never
span a newline. Use them with ``regex`` partial matching to tell "not a tag" from "not yet".
"""

from __future__ import annotations

import regex

from dsv4.chat.tokens import EOS, THINK_END

_MARK = r"(?:[|｜]{1,2} ?DSML ?[|｜]{1,2} ?)"
_BLOCK_NAME = r"(?:tool_?calls?|function_?calls?)"

OPEN_BLOCK = rf"< ?{_MARK}{_BLOCK_NAME} ?>"
CLOSE_BLOCK = rf"< ?/ ?{_MARK}?{_BLOCK_NAME} ?>"
OPEN_INVOKE = rf'< ?(?P<invoke_mark>{_MARK})?invoke +name ?= ?"(?P<name>[^"\n<>]*)" ?>'
CLOSE_INVOKE = rf"< ?/ ?{_MARK}?invoke ?>"
OPEN_PARAM = (rf'< ?(?P<param_mark>{_MARK})?parameter +name ?= ?"(?P<key>[^"\n<>]*)"'
              rf'(?: +string ?= ?"(?P<string>[^"\n<>]*)")? ?>')
CLOSE_PARAM_MARKED = rf"< ?/ ?{_MARK}parameter ?>"
CLOSE_PARAM_ANY = rf"< ?/ ?{_MARK}?parameter ?>"
CLOSE_INVOKE_MARKED = rf"< ?/ ?{_MARK}invoke ?>"
_EOS = regex.escape(EOS)


def _alternatives(**named: str) -> regex.Pattern[str]:
    return regex.compile("|".join(f"(?P<{name}>{body})" for name, body in named.items()))


# A DSML-marked tag that cannot start a block, such as a stray closer. It ends at ">", or
# before a "<" or newline; the lookahead keeps it undecided until that character arrives.
STRAY_TAG = rf"< ?/? ?{_MARK}[^<>\n]*(?:>|(?=[<\n]))"

# Tags that end reasoning or content. Marker-less invokes count only in content, because
# reasoning often discusses the format while a bare tag in content is a malformed call.
REASONING_STOPS = _alternatives(think_end=regex.escape(THINK_END), open_block=OPEN_BLOCK,
                                bare_invoke=rf"< ?{_MARK}invoke +name", eos=_EOS,
                                stray=STRAY_TAG)
CONTENT_STOPS = _alternatives(open_block=OPEN_BLOCK, bare_invoke=rf"< ?{_MARK}?invoke +name",
                              eos=_EOS, stray=STRAY_TAG)

# Tags between invokes and between the parameters of one invoke.
BLOCK_TAGS = _alternatives(open_invoke=OPEN_INVOKE, close_invoke=CLOSE_INVOKE,
                           close_block=CLOSE_BLOCK, open_param=OPEN_PARAM,
                           close_param=CLOSE_PARAM_ANY, eos=_EOS)

# Tags that end a parameter value. Inside a value opened with the marker only marked tags end
# it, so a string value may contain ``</parameter>`` or ``<invoke`` as text.
VALUE_STOPS_MARKED = _alternatives(close_param=CLOSE_PARAM_MARKED,
                                   open_param=rf"< ?{_MARK}parameter +name ?= ?\"",
                                   close_invoke=CLOSE_INVOKE_MARKED,
                                   close_block=rf"< ?/ ?{_MARK}{_BLOCK_NAME} ?>", eos=_EOS)
VALUE_STOPS_ANY = _alternatives(close_param=CLOSE_PARAM_ANY,
                                open_param=rf"< ?{_MARK}?parameter +name ?= ?\"",
                                close_invoke=CLOSE_INVOKE, close_block=CLOSE_BLOCK, eos=_EOS)

# Tags that end a rejected invoke.
SKIP_STOPS = _alternatives(close_invoke=CLOSE_INVOKE, close_block=CLOSE_BLOCK,
                           open_invoke=rf"< ?{_MARK}invoke +name", eos=_EOS)


def find_stop(pattern: regex.Pattern[str], text: str, final: bool,
              ) -> tuple[int, regex.Match[str] | None]:
    """Find the first full match of `pattern` at a ``<`` in `text`.

    Returns (position, match). Without a full match, match is None and the position is where
    a partial match runs to the end of the text, so more text may complete it. When `final`
    is set, or nothing could match, the position is ``len(text)``.
    """
    position = text.find("<")
    while position != -1:
        match = pattern.match(text, position, partial=True)
        if match is not None:
            if not match.partial:
                return position, match
            if not final:
                return position, None
        position = text.find("<", position + 1)
    return len(text), None
