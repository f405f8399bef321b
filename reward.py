"""Reading an answer: the final box, the integer reward of the arithmetic task (`reward_for`), and the math answer
prepared for math-verify (`_response_latex`, `_gold_latex`; verifier.py runs math-verify on it in worker processes).

    >>> reward_for("8 * 4 = 32, so the answer is \\boxed{32}.", type("P", (), {"answer": "32"})())
    1.0

The policy is optimised against these rules, so they pay only an answer that commits to one value: a hedge
(`\\boxed{11, 12}`, `\\boxed{13 or 12}`, `\\boxed{11} or \\boxed{12}`) scores 0 whatever it contains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

BOXED_START = re.compile(r"\\boxed\s*\{")
UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# ----------------------------------------------------------------------------------------------
# The final box


@dataclass
class Box:
    start: int  # index of the backslash of "\boxed"
    close: int  # index of its closing "}"
    content: str


def completed_boxes(text: str) -> list[Box]:
    """Every closed, non-empty \\boxed{...} in order of its opening brace, braces matched.

    Escaped braces (`\\{1, 2\\}`) do not count, and a box left open (a truncated response) is skipped.
    One pass: linear in len(text).
    """
    box_at = {m.end() - 1: m.start() for m in BOXED_START.finditer(text)}  # index of a box's "{" -> its "\boxed"
    open_braces, boxes = [], []
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 1  # skip the escaped character: \{ \} \\
        elif text[i] == "{":
            open_braces.append(i)
        elif text[i] == "}" and open_braces:
            at = open_braces.pop()
            if at in box_at and text[at + 1:i].strip():
                boxes.append((at, Box(box_at[at], i, text[at + 1:i])))
        i += 1
    return [box for _, box in sorted(boxes, key=lambda pair: pair[0])]


def final_box(text: str) -> tuple[Box | None, list[Box]]:
    """-> (the final box, the boxes before it): the last box not nested in another one, which holds the
    last-opened box. A box inside a box is read with its outer box (`\\boxed{11 \\text{ or } \\boxed{12}}` is
    the hedge `11 or 12`, not 12)."""
    top = []  # closed boxes in opening order, none inside another
    for box in completed_boxes(text):
        if not top or box.start > top[-1].close:
            top.append(box)
    return (top[-1] if top else None), top[:-1]


def last_boxed(text: str) -> str | None:
    """The content of the final non-empty \\boxed{...} (`final_box`); None without one.

    `a \\boxed{5}, again \\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`.
    """
    box = final_box(text)[0]
    return box.content if box else None


CONNECTIVE = re.compile(r"\\(?:text|mbox|textrm|mathrm)\s*\{|\\q?quad|\\[,;:! ]|\\[()]|[\s$,;:.{}]"
                        r"|\b(?:or|and|either|maybe)\b", re.IGNORECASE)


def boxes_are_alternatives(text: str) -> bool:
    """True when the last box sits next to an earlier box with a different answer, joined by nothing but a
    connective: `\\boxed{11} or \\boxed{12}`, `\\boxed{11}, \\boxed{12}`,
    `\\boxed{\\frac12} \\text{ or } \\boxed{\\frac13}`.

    A later box after words (`I got \\boxed{2}, no wait, it is \\boxed{3}`, `Step 2: \\boxed{2}. Final: \\boxed{3}`)
    is a revision, and the last box is the answer.
    """
    last, earlier = final_box(text)
    if not earlier:
        return False
    before = earlier[-1]
    if "".join(before.content.split()) == "".join(last.content.split()):
        return False  # the same answer twice
    return not CONNECTIVE.sub("", text[before.close + 1:last.start])


# ----------------------------------------------------------------------------------------------
# The integer reward (the arithmetic task)

MINUS_SIGNS = str.maketrans({c: "-" for c in "\u2212\u2012\u2013\u2014\ufe63\uff0d"})  # − ‒ – — ﹣ －
FULL_WIDTH = str.maketrans({0xFF01 + i: 0x21 + i for i in range(94)} | {0x3000: " "})  # １２ -> 12
SWITCHES = re.compile(r"\\(?:color|textcolor)\s*\{[^{}]*\}|\\(?:bf|it|rm|large|Large|LARGE|huge|Huge|small)"
                      r"(?![A-Za-z])")  # `\color{blue}{12}`, `{\bf 12}`: formatting without a value
SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~|\\\$|\$|\\left\b|\\right\b|\\displaystyle\b")
HEDGE_WORDS = re.compile(r"\b(?:or|and|to|than|more|less|about|approx\w*|around|least|most|between|either|nor|plus|"
                         r"minus|times|over|divided|per|cent|percent)\b", re.IGNORECASE)
SQUARED = r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?"  # cm^2, m^{3}
UNIT_TEXT = re.compile(r"\s*\\(?:text|mbox|textrm|mathrm)\s*\{([A-Za-z .]*)\}" + SQUARED + r"\s*$")  # `\text{ cm}^2`
UNIT_WORDS = re.compile(r"(?<=[\d}])\s+([A-Za-z][A-Za-z .]*)" + SQUARED + "$")  # `12 apples`, `12 cm^2`
DEGREES = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z]))\s*$")  # `12^\circ`, `12^{\circ}`, `12°`
REMARK = re.compile(r"\s*(?:\\(?:text|mbox|textrm)\s*\{\s*\(([^(){}]*)\)\s*\}|\(([^(){}]*[A-Za-z][^(){}]*)\))\s*$")
REMARK_HEDGE = re.compile(r"\\pm|±|\b(?:or|either|nor|between|about|approx\w*|around|roughly|maybe|possibly|perhaps|"
                          r"probably|if|unless|otherwise|else|alternative\w*|actually|instead|rather|not|wait|but|"
                          r"plus|minus|more|less|least|most|than|up)\b", re.IGNORECASE)  # `(or 13)`, `(if ...)`
FORMATTING = re.compile(r"\\(?:mathbf|textbf|boldsymbol|bm|mathrm|text|textrm|mbox|boxed|fbox|underline|mathit|"
                        r"textit|emph|mathsf|textsf)\s*\{([^{}]*)\}")
ANSWER_LABEL = r"(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*:?"
LABEL = re.compile(r"^\s*" + ANSWER_LABEL, re.IGNORECASE)  # `\text{Answer: } 12`, once unwrapped
NAME = re.compile(r"\s*[A-Za-z](?:_\{?\w+\}?)?\s*")  # the name in `x = 12`, `n_1 = 12`, `12 = x`
SIGNED_INTEGER = re.compile(r"\s*(?P<sign>[+-]?)\s*(?P<open>\(?)\s*(?P<inner>[+-]?)\s*(?P<digits>\d{1,3}"
                            r"(?P<sep>[, \u00a0\u2009\u202f])\d{3}(?:(?P=sep)\d{3})*|\d+)"  # 1,000  1 000  1\,000
                            r"(?:\.0*)?\s*(?P<close>\)?)\s*\.?\s*")
ARITHMETIC_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([-+*/^()]))")
FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def arithmetic_value(expr: str) -> Fraction | None:
    """The exact value of numbers joined by + - * / ^ and parentheses (`\\times`, `\\cdot`, `\\div`, `\\frac{a}{b}`,
    braces); None for anything else (a name, a root, a power past 4096 bits, over 200 characters). Never raises.

    `10 + 2` -> 12, `\\frac{36}{3}` -> 12, `2x` -> None.
    """
    if len(expr) > 200:
        return None
    while (flat := FRAC.sub(r"(\1)/(\2)", expr)) != expr:
        expr = flat
    expr = re.sub(r"\\div|÷", "/", re.sub(r"\\times|\\cdot|×|·", "*", expr)).replace("{", "(").replace("}", ")")
    tokens, at = [], 0
    while expr[at:].strip():
        if (m := ARITHMETIC_TOKEN.match(expr, at)) is None:
            return None
        tokens.append(m[1] or m[2])
        at = m.end()
    tokens.append("")  # the end

    def take(*ops):
        if tokens[0] in ops:
            return tokens.pop(0)
        return None

    def sum_():  # term (+|- term)*
        value = product()
        while op := take("+", "-"):
            value = value + product() if op == "+" else value - product()
        return value

    def product():  # signed (*|/ signed)*
        value = signed()
        while op := take("*", "/"):
            value = value * signed() if op == "*" else value / signed()
        return value

    def signed():  # (+|-)* power
        return -signed() if take("-") else signed() if take("+") else power()

    def power():  # atom (^ signed)?
        base = atom()
        if take("^"):
            exponent = signed()
            if exponent.denominator != 1 or abs(exponent) * max(base.numerator.bit_length(),
                                                                base.denominator.bit_length()) > 4096:
                raise ValueError(exponent)  # `((2^64)^64)^64` would take gigabytes: no answer is that long
            return base ** int(exponent)
        return base

    def atom():
        token = tokens.pop(0)
        if token == "(":
            value = sum_()
            if not take(")"):
                raise ValueError("unbalanced")
            return value
        return Fraction(token)  # a number; an operator or the end raises

    try:
        value = sum_()
        return value if tokens == [""] else None
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def _strip_end(s: str, pattern: re.Pattern, hedge: re.Pattern) -> tuple[str, bool]:
    """s without `pattern` at its end unless the match's text is a hedge -> (s, stripped). Searches only the last
    200 characters: the ends are short, and a long box stays linear."""
    m = pattern.search(s, max(len(s) - 200, 0))
    if m and not any(g and hedge.search(g) for g in m.groups()):
        return s[:m.start()], True
    return s, False


def integer_in_box(content: str) -> int | None:
    """The one integer a box holds, or None when it holds anything else. Never raises; any length is exact.

    Accepted (each row a test in tests/test_grading.py)      Refused (None)
      12   +12   012   12.   12.0   12.00   １２                  12.5   1/2   3/12   \\frac{24}{2}
      1,000   1{,}000   1\\,000   1 000                          11, 12   11,12   11; 12   {11, 12}   1,000 000
      x = 12   n_1 = 12   12 = x   10 + 2 = 12   x = 12 = 12     x = 3 + 9   11 = 12   10 + 3 = 12   2x = 12
      $12$   \\mathbf{12}   \\text{12}   {12}   \\color{blue}{12}   13 or 12   12 \\text{ or } 13   12 \\lor 13
      \\text{Answer: } 12   \\textbf{12}   \\underline{12}         12 \\text{ or more}   about 12   12 \\pm 1
      12 \\text{ apples}   12 apples   12 \\text{ cm}^2   12^\\circ   12 \\text{ (or 13)}   12 (if x > 0)
      12 \\text{ (after 3 days)}   12 (checked)                   10-12   10 \\text{ to } 12   10 \\le x \\le 12
      -12   − 12 (Unicode minus)   - 12   -(12)   (-12)         2^{12}   12^2   \\sqrt{12}   12!   x + 12   --12
    A side before the last `=` must be a name (one, first or last) or arithmetic whose value is the last side's
    integer: `10 + 2 = 12` states 12; `10 + 3 = 12` states two values and is refused.
    """
    s = content.translate(FULL_WIDTH).translate(MINUS_SIGNS).replace("{,}", ",")
    s = SPACING.sub(" ", SWITCHES.sub(" ", s))
    s = _strip_end(s, REMARK, REMARK_HEDGE)[0]  # `\text{ (after 3 days)}`; a hedge (`(or 13)`) stays and is refused
    for unit in (UNIT_TEXT, UNIT_WORDS):  # one trailing unit, never a hedge (`\text{ or more}`)
        s, stripped = _strip_end(s, unit, HEDGE_WORDS)
        if stripped:
            break
    s = _strip_end(s, DEGREES, HEDGE_WORDS)[0]
    while (unwrapped := FORMATTING.sub(r"\1", s)) != s:
        s = unwrapped
    s = LABEL.sub("", s, count=1)
    while s.strip().startswith("{") and s.strip().endswith("}") and s.count("{") == 1:
        s = s.strip()[1:-1]
    sides = s.split("=")
    if len(sides) > 1 and NAME.fullmatch(sides[0]):
        sides = sides[1:]  # x = 12
    elif len(sides) > 1 and NAME.fullmatch(sides[-1]):
        sides = sides[:-1]  # 12 = x
    m = SIGNED_INTEGER.fullmatch(sides[-1])
    if m is None or bool(m["open"]) != bool(m["close"]) or (m["sign"] and m["inner"]):
        return None
    try:
        value = int(re.sub(r"\D", "", m["digits"]))
    except ValueError:  # past Python's 4300-digit str -> int limit: no reference is that long
        return None
    value = -value if "-" in (m["sign"], m["inner"]) else value
    return value if all(arithmetic_value(side) == value for side in sides[:-1]) else None


SENTENCE_END = re.compile(r"\n|[.!?;](?=\s|$)")
STATEMENT_HEDGE = re.compile(r"\b(?:or|either|between|about|approx\w*|around|roughly|maybe|possibly|perhaps)\b",
                             re.IGNORECASE)
ANSWER_MARKER = re.compile(r"(?:=|\bequals\b|\bis(?:\s+equal\s+to)?\b|\banswer\b)\s*:?", re.IGNORECASE)  # `is: N`
FINAL_REMARK = re.compile(r"\(([^()]*)\)[\s.!]*$")  # "The answer is 12. (Checked it 2 ways.)"
LIST_END = re.compile(r"(?:[,;&+\-]|\band|\bor)\s*$", re.IGNORECASE)


def stated_integer(text: str) -> int | None:
    """Without a box: the answer the response's last sentence with a digit states after its last `=`, `equals`,
    `is`, `is equal to` or `answer:` (N one integer by `integer_in_box`'s rules, nothing after it), or a bare integer
    that is the whole last line; None for anything else, or a hedge word (or, between, about, ...) in that sentence.
    A final parenthetical remark is read past, unless it hedges, revises or states another integer.

    "4 + 9 = 13.", "So, the answer is 13.", "11 * 3 equals 33.", "14 * 4 = 56\\n\\nThis is the final answer.",
    "7 + 6\\n13" and "The answer is 13. (Checked it 2 ways.)" state 13, 13, 33, 56, 13, 13;
    "Possible values: 9, 10, 11, 12" (no statement), "x = 11 or x = 12" (a hedge), "The answer is 12, 13",
    "the answer is 12. Or 13", "11\\n12" (a list) and "The answer is 12. (Or 13.)" state none.
    """
    if (remark := FINAL_REMARK.search(text)) is None:
        return _statement(text)
    if REMARK_HEDGE.search(remark[1]):
        return None
    value = _statement(text[:remark.start()])  # one remark: a second one before it is read as text
    return value if _statement(remark[1]) in (None, value) else None


def _statement(text: str) -> int | None:
    """`stated_integer` without the final remark."""
    sentences = [s for s in SENTENCE_END.split(text) if re.search(r"\d", s)]
    if not sentences or STATEMENT_HEDGE.search(sentences[-1]):
        return None
    markers = list(ANSWER_MARKER.finditer(sentences[-1]))
    if markers:
        return integer_in_box(sentences[-1][markers[-1].end():])
    lines = [line for line in text.splitlines() if line.strip()]
    previous = lines[-2] if len(lines) > 1 else ""  # not a list (`11\n12`, `11,\n12`) nor a hedge (`11 or\n12`)
    if integer_in_box(previous) is not None or STATEMENT_HEDGE.search(previous) or LIST_END.search(previous):
        return None
    return integer_in_box(lines[-1])


def extract_integer_answer(text: str) -> int | None:
    """The integer in the response's final box; None for a hedged pair of boxes or when the box holds anything but
    one integer (`integer_in_box`). Without a box, the integer its last sentence states (`stated_integer`).

    The no-box rule reads a statement, never a number found somewhere: "the last integer in the text" paid
    "Possible values: 9, 10, 11, 12" for gold 12. It stays because SmolLM2-135M, asked for \\boxed{}, boxes
    almost never: of its 800 held-out answers at step 0 of the default run, 0.1% score on boxes alone, 29.1% with
    this rule (the last integer anywhere: 32.6%).
    """
    box = last_boxed(text)
    if box is None:
        return stated_integer(text)
    return None if boxes_are_alternatives(text) else integer_in_box(box)


def reward_for(response: str, problem) -> float:
    """1.0 if the response's answer equals the integer reference (kind "int"), else 0.0. problem: a data.Problem
    (its .answer; this module imports nothing of the project's)."""
    got = extract_integer_answer(response)
    return float(got is not None and got == integer_in_box(problem.answer.strip()))


# ----------------------------------------------------------------------------------------------
# math-verify (every other task): refusals first, then the check in a warm worker process

ALTERNATIVES = re.compile(r"\bor\b|\\lor\b|\\vee\b|\\text\s*\{\s*either", re.IGNORECASE)
EQUATION_SIDE = re.compile(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?(?:\s*\([^()]*\))?'*\s*")  # x, a_1, \theta, f(x)


def _top_level_parts(box: str) -> list[str]:
    """The box split at commas outside braces, brackets and parentheses: `x=2, y=3` -> [`x=2`, ` y=3`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(box):
        depth += ch in "{[(" and box[i - 1:i] != "\\"
        depth -= ch in "}])" and box[i - 1:i] != "\\"
        if ch == "," and depth == 0:
            parts.append(box[start:i])
            start = i + 1
    return parts + [box[start:]]


def refused_box(box: str) -> str | None:
    """Why a final box is no single answer (-> scored 0 before verification), or None.

    Alternatives: `\\frac12 \\text{ or } \\frac13`, `1 \\lor 2`. An equation: any comma-separated part with two
    `=`, or with one and no name on either side (`\\frac13 = \\frac12`, `2x + 3 = 7`); `x = 3`, `12 = x`,
    `y = 2x + 3`, `x=2, y=3` and `f(x) = x^2` are answers.
    """
    if ALTERNATIVES.search(box):
        return "alternatives"
    for part in _top_level_parts(box):
        sides = part.split("=")
        if len(sides) > 2 or (len(sides) == 2 and not any(EQUATION_SIDE.fullmatch(side) for side in sides)):
            return "equation"
    return None


def _names_first(box: str) -> str:
    """`12 = x` -> `x = 12` in each comma-separated part: math-verify reads an answer `name = value` by its value."""
    parts = [part.split("=") for part in _top_level_parts(box)]
    if not any(len(p) == 2 and EQUATION_SIDE.fullmatch(p[1]) and not EQUATION_SIDE.fullmatch(p[0]) for p in parts):
        return box
    return ",".join("=".join(p[::-1] if len(p) == 2 and EQUATION_SIDE.fullmatch(p[1]) else p) for p in parts)


PERCENT = re.compile(r"\s*(?:\\?%|\\(?:text|mathrm|textrm)\s*\{\s*(?:\\?%|percent)\s*\})|(?<=\d)\s*percent\b")
THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?P<sep>\\,|\\ |~|\{,\}|[\u2009\u202f])\d{3})(?:(?P=sep)\d{3})*(?!\d)")
BOX_LABEL = re.compile(rf"^\s*(?:\\(?:text|textbf|mathrm|textrm|mbox)\s*\{{\s*{ANSWER_LABEL}\s*\}}|{ANSWER_LABEL})",
                       re.IGNORECASE)  # `\text{Answer: } 12`
SPACE_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?P<sep>[ \u00a0])\d{3})(?:(?P=sep)\d{3})*(?!\d)")


def _math_text(latex: str, in_box: bool) -> str:
    """Reference or answer text as math-verify reads it: full-width digits as ASCII (`１２` -> 12), `\\color{...}`
    dropped, thousands separators dropped (`1\\,000`, `1{,}000`; a plain space, `1 000`, only in a box or a
    reference, never in prose: "in 2 100-gram bags"), and every percent sign dropped.

    The percent sign is read as a unit, like `\\text{ cm}`: `2\\%` is compared as 2, so it pays for reference `2`
    (a percentage written without its sign, as in MATH) or `2\\%`, never for `0.02`; reference `50\\%` pays `50`
    and `50\\%`, not `0.5`. math-verify alone reads `2\\%` as 2 against an integer and as 0.02 against a decimal,
    so one answer was paid for two references a hundred times apart.
    """
    text = PERCENT.sub("", SWITCHES.sub(" ", latex.translate(FULL_WIDTH)))
    if in_box:
        text = BOX_LABEL.sub("", text, count=1)
    for pattern in (THOUSANDS, SPACE_THOUSANDS) if in_box else (THOUSANDS,):
        text = pattern.sub(lambda m: re.sub(r"\D", "", m[0]), text)
    return text


def _gold_latex(gold: str) -> str:
    """The reference as math-verify input (`_math_text`): its last box if boxed, kept if $-delimited, else wrapped in
    $...$.

    An escaped dollar is currency, not a delimiter: `\\$18.90` -> `$\\$18.90$` (parses to 18.9).
    """
    box = last_boxed(gold)
    if box is not None:
        return f"\\boxed{{{_math_text(box, True)}}}"
    gold = _math_text(gold, True)
    return gold if UNESCAPED_DOLLAR.search(gold) else f"${gold}$"


def _response_latex(response: str, gold: str) -> str | None:
    """The response as math-verify input (`_math_text`): only its last box when it has one (`\\boxed{5} ...
    \\boxed{7}` -> 7); None when that box is refused (`refused_box`) or sits next to a different one
    (`boxes_are_alternatives`). An equation is refused only when the reference is none: for reference
    `x' + \\frac{r}{V} x - r c = 0` an equation is the answer asked for, and math-verify compares the two."""
    box = last_boxed(response)
    if box is None:
        return _math_text(response, False)
    reason = refused_box(box)
    if reason == "equation" and refused_box(last_boxed(gold) or gold) == "equation":
        reason = None
    if reason or boxes_are_alternatives(response):
        return None
    return f"\\boxed{{{_names_first(_math_text(box, True))}}}"
