#!/usr/bin/env python3
"""Independent FHIR R4 search oracle.

Computes, from the R4 specification (https://hl7.org/fhir/R4/search.html), the official R4
SearchParameter definitions and the data alone, which resources a FHIR search must return, so that a
server's answers can be compared with it, and, for _sort and _include/_revinclude, their order and the
resources the includes bring in. It shares no code with the server.

    python oracle.py --data DIR --params search-parameters.json.gz --queries queries.tsv
    python oracle.py --self-test

Each parameter's FHIRPath expression is evaluated with fhirpathpy (R4 model); the matching rules of the
parameter's type are applied here. Whatever it does not support, it refuses (an "error" line) rather
than guess. See README.md beside this file for the rules and the decisions taken.
"""

import argparse
import functools
import glob
import gzip
import json
import os
import re
import sys
import time
import unicodedata
from decimal import Decimal
from urllib.parse import unquote_plus


class Unsupported(Exception):
    """The oracle refuses to answer this query (never guesses)."""


# --------------------------------------------------------------------------------------------------
# Escaping (search.html#escaping): \, \| \$ \\ ; any other backslash is refused.

def split_unescaped(s, sep):
    """Splits s on occurrences of sep that are not escaped by a backslash. Escapes are kept."""
    parts, cur, i = [], [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            if i + 1 >= len(s):
                raise Unsupported("a lone backslash at the end of a value")
            cur.append(s[i:i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape(s):
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            if i + 1 >= len(s):
                raise Unsupported("a lone backslash at the end of a value")
            nxt = s[i + 1]
            if nxt not in ",|$\\":
                raise Unsupported("unknown escape \\%s" % nxt)
            out.append(nxt)
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Strings (search.html#string)

def _strip_marks(s):
    s = unicodedata.normalize("NFD", s)
    return "".join(c for c in s if not unicodedata.combining(c))


def fold(s):
    """Case- and accent-insensitive form: NFD, combining marks dropped, casefolded (twice, as
    casefolding can itself produce decomposable characters)."""
    return _strip_marks(_strip_marks(s).casefold())


HUMANNAME_PARTS = ("family", "given", "prefix", "suffix", "text")
ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")
STRING_TYPES = {"string", "markdown"}


def string_parts(ftype, data):
    """The strings a string search looks at in one value."""
    if ftype in STRING_TYPES:
        return [data]
    if ftype in ("HumanName", "Address"):
        out = []
        for k in HUMANNAME_PARTS if ftype == "HumanName" else ADDRESS_PARTS:
            v = data.get(k)
            if isinstance(v, list):
                out.extend(x for x in v if isinstance(x, str))
            elif isinstance(v, str):
                out.append(v)
        return out
    raise Unsupported("string search on a %s value" % ftype)


def string_match(modifier, search, stored):
    if modifier == "exact":
        return stored == search
    if modifier == "contains":
        return fold(search) in fold(stored)
    return fold(stored).startswith(fold(search))


class StringMatcher:
    def __init__(self, raw, modifier):
        self.search = unescape(raw)
        if self.search == "":
            raise Unsupported("empty string value")
        self.modifier = modifier

    def check_type(self, ftype):
        string_parts(ftype, {})  # raises when unsupported

    def __call__(self, values):
        for ftype, data in values:
            for s in string_parts(ftype, data):
                if string_match(self.modifier, self.search, s):
                    return True
        return False


# --------------------------------------------------------------------------------------------------
# Tokens (search.html#token)

SYSTEM_TYPES = {"Coding", "CodeableConcept", "Identifier"}
# Values that carry no system of their own: a search naming a system (s|c, |c, s|) is refused on them.
# (code has an implicit system, from its binding, that the oracle does not know.)
SYSTEMLESS_TYPES = {"code", "string", "id", "uri", "url", "canonical", "oid", "uuid", "ContactPoint",
                    "boolean", "markdown"}


def token_codings(ftype, data):
    """(system, code) pairs of a value with a system."""
    if ftype == "Coding":
        return [(data.get("system"), data.get("code"))]
    if ftype == "CodeableConcept":
        return [(c.get("system"), c.get("code")) for c in data.get("coding", []) if isinstance(c, dict)]
    if ftype == "Identifier":
        return [(data.get("system"), data.get("value"))]
    raise AssertionError(ftype)


def token_plain(ftype, data):
    """The code of a value without a system."""
    if ftype == "ContactPoint":
        return data.get("value")
    if ftype == "boolean":
        return "true" if data else "false"
    return data


def token_texts(ftype, data):
    if ftype == "CodeableConcept":
        out = [data.get("text")] + [c.get("display") for c in data.get("coding", []) if isinstance(c, dict)]
    elif ftype == "Coding":
        out = [data.get("display")]
    elif ftype == "Identifier":
        out = [(data.get("type") or {}).get("text")]
    else:
        raise Unsupported(":text on a %s value (only CodeableConcept, Coding, Identifier have text)" % ftype)
    return [t for t in out if isinstance(t, str)]


def of_type_match(type_system, type_code, value, ftype, data):
    """:of-type (search.html#token): an Identifier whose type has a Coding (type_system, type_code) and
    whose value is value. Any other value type does not match."""
    if ftype != "Identifier" or data.get("value") != value:
        return False
    t = data.get("type")
    if not isinstance(t, dict):
        return False
    return any(isinstance(c, dict) and c.get("system") == type_system and c.get("code") == type_code
               for c in t.get("coding", []))


class TokenMatcher:
    def __init__(self, raw, modifier):
        self.modifier = modifier
        if modifier == "text":
            self.text = unescape(raw)
            if not self.text:
                raise Unsupported("empty :text value")
            return
        if modifier == "of-type":
            parts = [unescape(p) for p in split_unescaped(raw, "|")]
            if len(parts) != 3 or not all(parts):
                raise Unsupported(":of-type value must be system|code|value, all three non-empty")
            self.type_system, self.type_code, self.value = parts
            return
        parts = split_unescaped(raw, "|")
        if len(parts) == 1:
            self.has_bar, self.system, self.code = False, None, unescape(parts[0])
            if self.code == "":
                raise Unsupported("empty token value")
        elif len(parts) == 2:
            self.has_bar = True
            self.system = unescape(parts[0])
            self.code = unescape(parts[1])
            if self.system == "" and self.code == "":
                raise Unsupported("token value '|' names neither system nor code")
        else:
            raise Unsupported("token value with more than one unescaped '|'")

    def check_type(self, ftype):
        if self.modifier == "text":
            token_texts(ftype, {})
            return
        if self.modifier == "of-type":
            return   # only an Identifier can match; any other value simply does not
        if ftype in SYSTEM_TYPES:
            return
        if ftype in SYSTEMLESS_TYPES:
            if self.has_bar:
                raise Unsupported("token search with a '|' (system) on a %s value, which has no system "
                                  "of its own" % ftype)
            if ftype == "boolean" and self.code not in ("true", "false"):
                raise Unsupported("token value %r on a boolean" % self.code)
            return
        raise Unsupported("token search on a %s value" % ftype)

    def one(self, ftype, data):
        if self.modifier == "text":
            return any(fold(t).startswith(fold(self.text)) for t in token_texts(ftype, data))
        if self.modifier == "of-type":
            return of_type_match(self.type_system, self.type_code, self.value, ftype, data)
        if ftype in SYSTEM_TYPES:
            for system, code in token_codings(ftype, data):
                if not self.has_bar:
                    if code == self.code:
                        return True
                elif self.system == "":
                    if code == self.code and system is None:
                        return True
                elif self.code == "":
                    if system == self.system:
                        return True
                elif system == self.system and code == self.code:
                    return True
            return False
        return token_plain(ftype, data) == self.code

    def __call__(self, values):
        return any(self.one(f, d) for f, d in values)


# --------------------------------------------------------------------------------------------------
# Dates (search.html#date, #prefix). A date is a half-open range [lo, hi) in integer nanoseconds since
# 1970-01-01T00:00:00Z. Values without a timezone are taken as UTC.

NS = 10 ** 9
DAY = 86400 * NS
INF = float("inf")
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def days_from_civil(y, m, d):
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def days_in_month(y, m):
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def date_range(s, search=False):
    """[lo, hi) of a date / dateTime / instant string, by its precision."""
    m = DATE_RE.match(s)
    if not m:
        raise Unsupported("not a date: %r" % s)
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    y = int(y)
    if not search and hh is not None and ss is None:
        raise Unsupported("stored dateTime without seconds: %r" % s)
    if frac is not None and len(frac) > 9:
        raise Unsupported("more than 9 fraction digits: %r" % s)
    mo_i = int(mo) if mo else 1
    d_i = int(d) if d else 1
    if not 1 <= mo_i <= 12 or not 1 <= d_i <= days_in_month(y, mo_i):
        raise Unsupported("invalid date %r" % s)
    h_i = int(hh) if hh else 0
    mi_i = int(mi) if mi else 0
    s_i = int(ss) if ss else 0
    if h_i > 23 or mi_i > 59 or s_i > 59:
        raise Unsupported("invalid time %r" % s)
    offset = 0
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        th, tm = int(tz[1:3]), int(tz[4:6])
        if th > 14 or tm > 59:
            raise Unsupported("invalid timezone %r" % s)
        offset = sign * (th * 3600 + tm * 60) * NS
    base = days_from_civil(y, mo_i, d_i) * DAY
    lo = base + (h_i * 3600 + mi_i * 60 + s_i) * NS
    if frac:
        lo += int(frac.ljust(9, "0"))
    if mo is None:
        hi = days_from_civil(y + 1, 1, 1) * DAY
    elif d is None:
        hi = days_from_civil(y + (mo_i == 12), mo_i % 12 + 1, 1) * DAY
    elif hh is None:
        hi = base + DAY
    elif ss is None:
        hi = lo + 60 * NS
    elif frac is None:
        hi = lo + NS
    else:
        hi = lo + 10 ** (9 - len(frac))
    return lo - offset, hi - offset


DATE_PRIMITIVES = {"date", "dateTime", "instant"}


def date_ranges(ftype, data):
    """The ranges of one stored value (a Timing gives one per event)."""
    if ftype in DATE_PRIMITIVES:
        return [date_range(data)]
    if ftype == "Period":
        start, end = data.get("start"), data.get("end")
        if start is None and end is None:
            return []
        lo = date_range(start)[0] if start is not None else -INF
        hi = date_range(end)[1] if end is not None else INF
        return [(lo, hi)]
    if ftype == "Timing":
        return [date_range(e) for e in data.get("event", []) if isinstance(e, str)]
    raise Unsupported("date search on a %s value" % ftype)


def date_compare(prefix, s_lo, s_hi, t_lo, t_hi, now_ns=None):
    """The R4 prefix table on ranges: search [s_lo, s_hi), target [t_lo, t_hi)."""
    contained = s_lo <= t_lo and t_hi <= s_hi
    if prefix == "eq":
        return contained
    if prefix == "ne":
        return not contained
    if prefix == "gt":
        return t_hi > s_hi
    if prefix == "lt":
        return t_lo < s_lo
    if prefix == "ge":
        return t_hi > s_hi or contained
    if prefix == "le":
        return t_lo < s_lo or contained
    if prefix == "sa":
        return t_lo >= s_hi
    if prefix == "eb":
        return t_hi <= s_lo
    if prefix == "ap":
        margin = abs(now_ns - s_lo) // 10
        return t_lo < s_hi + margin and t_hi > s_lo - margin
    raise AssertionError(prefix)


def split_prefix(raw):
    if len(raw) >= 2 and raw[:2].isalpha():
        if raw[:2] in PREFIXES:
            return raw[:2], raw[2:]
        raise Unsupported("unknown prefix %r" % raw[:2])
    return "eq", raw


class DateMatcher:
    def __init__(self, raw, modifier, now_ns):
        self.prefix, v = split_prefix(unescape(raw))
        self.lo, self.hi = date_range(v, search=True)
        self.now_ns = now_ns

    def check_type(self, ftype):
        if ftype not in DATE_PRIMITIVES and ftype not in ("Period", "Timing"):
            raise Unsupported("date search on a %s value" % ftype)

    def __call__(self, values):
        for ftype, data in values:
            for t_lo, t_hi in date_ranges(ftype, data):
                if date_compare(self.prefix, self.lo, self.hi, t_lo, t_hi, self.now_ns):
                    return True
        return False


# --------------------------------------------------------------------------------------------------
# Numbers and quantities (search.html#number, #quantity)

NUMBER_RE = re.compile(r"^[+-]?\d+(\.\d+)?$")


def parse_number(s):
    """(value, lo, hi): the value and its implicit-precision range [lo, hi)."""
    if not NUMBER_RE.match(s):
        raise Unsupported("not a number (exponents are refused): %r" % s)
    v = Decimal(s)
    decimals = len(s.split(".")[1]) if "." in s else 0
    half = Decimal(5).scaleb(-(decimals + 1))
    return v, v - half, v + half


def number_compare(prefix, v, lo, hi, t):
    """Stored numbers are points; the search value has its implicit precision for eq/ne/ap/sa/eb."""
    if prefix == "eq":
        return lo <= t < hi
    if prefix == "ne":
        return not (lo <= t < hi)
    if prefix == "gt":
        return t > v
    if prefix == "lt":
        return t < v
    if prefix == "ge":
        return t >= v
    if prefix == "le":
        return t <= v
    if prefix == "sa":
        return t >= hi
    if prefix == "eb":
        return t < lo
    if prefix == "ap":
        margin = abs(v) / 10
        return (lo <= t < hi) or (v - margin <= t <= v + margin)
    raise AssertionError(prefix)


NUMBER_TYPES = {"decimal", "integer", "positiveInt", "unsignedInt"}
QUANTITY_TYPES = {"Quantity", "Age", "Duration", "Count", "Distance", "SimpleQuantity", "MoneyQuantity"}


def as_decimal(x):
    if isinstance(x, bool) or not isinstance(x, (int, Decimal, float)):
        return None
    return x if isinstance(x, Decimal) else Decimal(str(x))


class NumberMatcher:
    def __init__(self, raw, modifier):
        self.prefix, v = split_prefix(unescape(raw))
        self.v, self.lo, self.hi = parse_number(v)

    def check_type(self, ftype):
        if ftype not in NUMBER_TYPES:
            raise Unsupported("number search on a %s value" % ftype)

    def __call__(self, values):
        for ftype, data in values:
            t = as_decimal(data)
            if t is not None and number_compare(self.prefix, self.v, self.lo, self.hi, t):
                return True
        return False


class QuantityMatcher:
    def __init__(self, raw, modifier):
        parts = split_unescaped(raw, "|")
        if len(parts) == 1:
            self.system = self.code = None
        elif len(parts) == 3:
            self.system, self.code = unescape(parts[1]), unescape(parts[2])
            if self.code == "":
                raise Unsupported("quantity value with a system but no code, or '||' with no unit")
        else:
            raise Unsupported("quantity value must be number, number|system|code or number||code")
        self.prefix, v = split_prefix(unescape(parts[0]))
        self.v, self.lo, self.hi = parse_number(v)

    def check_type(self, ftype):
        if ftype not in QUANTITY_TYPES:
            raise Unsupported("quantity search on a %s value" % ftype)

    def __call__(self, values):
        for ftype, data in values:
            if "comparator" in data:
                raise Unsupported("stored Quantity with a comparator")
            t = as_decimal(data.get("value"))
            if t is None:
                continue
            if self.code is not None:
                if self.system:
                    if data.get("system") != self.system or data.get("code") != self.code:
                        continue
                elif self.code != data.get("code") and self.code != data.get("unit"):
                    continue
            if number_compare(self.prefix, self.v, self.lo, self.hi, t):
                return True
        return False


# --------------------------------------------------------------------------------------------------
# References (search.html#reference)

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
REL_REF_RE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
ABS_REF_RE = re.compile(r"^(https?://.+)/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/[^/]+)?$")


def parse_stored_reference(ref):
    """('local', Type, id) | ('absolute', url-without-history, Type, id) | ('other', ref)."""
    m = REL_REF_RE.match(ref)
    if m:
        return ("local", m.group(1), m.group(2))
    m = ABS_REF_RE.match(ref)
    if m:
        return ("absolute", "%s/%s/%s" % (m.group(1), m.group(2), m.group(3)), m.group(2), m.group(3))
    return ("other", ref)


def reference_type(ref, resource):
    """The type resolve() would give, or None."""
    if not isinstance(ref, str):
        return None
    if ref.startswith("#"):
        for c in resource.get("contained", []):
            if isinstance(c, dict) and c.get("id") == ref[1:]:
                return c.get("resourceType")
        return None
    p = parse_stored_reference(ref)
    return p[1] if p[0] == "local" else p[2] if p[0] == "absolute" else None


class ReferenceMatcher:
    def __init__(self, raw, modifier, targets, resource_types):
        self.identifier = None     # with :identifier, a token matcher applied to Reference.identifier
        self.exact = None          # a stored reference string to compare whole
        self.local = None          # set of (Type, id)
        if modifier == "identifier":
            # search.html#reference: "the search value works as a token search" on Reference.identifier:
            # system|value, value, |value (no system), system| (any value). It does not resolve anything.
            self.identifier = TokenMatcher(raw, "")
            return
        v = unescape(raw)
        if v == "":
            raise Unsupported("empty reference value")
        if modifier:               # the :Type modifier
            if modifier not in targets:
                raise Unsupported("modifier :%s is not a target type of this parameter" % modifier)
            if not ID_RE.match(v):
                raise Unsupported("with :%s the value must be a bare id" % modifier)
            self.local = {(modifier, v)}
        elif "://" in v:
            if "/_history/" in v:
                raise Unsupported("version-specific reference search")
            m = ABS_REF_RE.match(v)
            if not m or m.group(2) not in resource_types:
                raise Unsupported("absolute reference value not ending in Type/id")
            self.exact = v
            # The oracle cannot know the server's base URL: it takes the URL as one of the server's own.
            self.local = {(m.group(2), m.group(3))}
        elif v.startswith("urn:"):
            self.exact = v
        elif "/" in v:
            m = re.match(r"^([A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$", v)
            if not m or m.group(1) not in resource_types:
                raise Unsupported("reference value %r is not Type/id" % v)
            self.local = {(m.group(1), m.group(2))}
        else:
            if not ID_RE.match(v):
                raise Unsupported("reference value %r is not an id" % v)
            self.local = {(t, v) for t in targets}

    def check_type(self, ftype):
        if ftype != "Reference":
            raise Unsupported("reference search on a %s value" % ftype)

    def __call__(self, values):
        for ftype, data in values:
            if self.identifier is not None:
                ident = data.get("identifier")
                if isinstance(ident, dict) and self.identifier.one("Identifier", ident):
                    return True
                continue
            ref = data.get("reference")
            if not isinstance(ref, str):
                continue
            p = parse_stored_reference(ref)
            if p[0] == "local":
                if self.local and (p[1], p[2]) in self.local:
                    return True
            elif p[0] == "absolute":
                if self.exact is not None and p[1] == self.exact:
                    return True
            elif self.exact is not None and ref == self.exact:
                return True
        return False


# --------------------------------------------------------------------------------------------------
# URIs (search.html#uri)

URI_TYPES = {"uri", "url", "canonical", "oid", "uuid"}


class UriMatcher:
    def __init__(self, raw, modifier):
        self.v = unescape(raw)
        if self.v == "":
            raise Unsupported("empty uri value")
        self.modifier = modifier

    def check_type(self, ftype):
        if ftype not in URI_TYPES:
            raise Unsupported("uri search on a %s value" % ftype)

    def __call__(self, values):
        for ftype, data in values:
            if ftype == "canonical" and "|" in data:
                raise Unsupported("stored canonical with a version")
            if self.modifier == "below":
                if data.startswith(self.v):
                    return True
            elif self.modifier == "above":
                if self.v.startswith(data):
                    return True
            elif data == self.v:
                return True
        return False


# --------------------------------------------------------------------------------------------------
# Expressions

def split_top_level(expr, sep="|"):
    parts, cur, depth, quote = [], [], 0, None
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            cur.append(ch)
            if ch == "\\" and i + 1 < len(expr):
                cur.append(expr[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'`\"":
            quote = ch
            cur.append(ch)
        elif ch == "(":
            depth += 1
            cur.append(ch)
        elif ch == ")":
            depth -= 1
            cur.append(ch)
        elif ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


RESOLVE_RE = re.compile(r"\.where\(\s*resolve\(\)\s+is\s+([A-Za-z]+)\s*\)\s*$")


def rewrite_part(part):
    """Returns (expression for fhirpathpy, resolve type filter or None).

    - a trailing .where(resolve() is T) is removed and done as a post-filter on the references;
    - `(E as T)` and `E.as(T)` become `E.ofType(T)` (R4's expressions apply `as` to collections, which
      strict FHIRPath, and fhirpathpy, reject when there are several items);
    - `DateTime` (a typo in R4's Observation-code-value-date component) becomes `dateTime`."""
    filt = None
    m = RESOLVE_RE.search(part)
    if m:
        filt = m.group(1)
        part = part[:m.start()]
    if "resolve(" in part:
        raise Unsupported("resolve() elsewhere than a trailing .where(resolve() is T)")
    prev = None
    while prev != part:
        prev = part
        part = re.sub(r"\(\s*([^()]*?)\s+as\s+([A-Za-z]+)\s*\)", r"(\1.ofType(\2))", part)
    m = re.match(r"^([^()]*?)\s+as\s+([A-Za-z]+)$", part)
    if m:
        part = "%s.ofType(%s)" % (m.group(1), m.group(2))
    part = re.sub(r"\.as\(\s*([A-Za-z]+)\s*\)", r".ofType(\1)", part)
    part = re.sub(r"\bofType\(DateTime\)", "ofType(dateTime)", part)
    if re.search(r"\sas\s", part):
        raise Unsupported("an 'as' the oracle cannot rewrite in %r" % part)
    return part, filt


def parts_for_type(sp, rtype):
    expr = sp.get("expression")
    if not expr:
        raise Unsupported("parameter %r has no FHIRPath expression" % sp["code"])
    common = any(b in ("Resource", "DomainResource") for b in sp["base"])
    out = []
    for part in split_top_level(expr):
        if common:
            part = re.sub(r"^(\(*\s*)(Resource|DomainResource)(?![A-Za-z0-9_])", r"\g<1>" + rtype, part)
        if re.match(r"^\(*\s*" + re.escape(rtype) + r"(?![A-Za-z0-9_])", part):
            out.append(rewrite_part(part))
    if not out:
        raise Unsupported("the expression of %r has no part for %s" % (sp["code"], rtype))
    return out


# --------------------------------------------------------------------------------------------------
# Data, parameters, evaluation

# Refused by eval_param. _sort, _include and _revinclude never reach it: search() handles them.
RESULT_PARAMS = {"_count", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total", "_format",
                 "_contained", "_containedType", "_pretty", "_type", "_since", "_at", "_list", "_text",
                 "_content", "_query", "_filter", "_has", "_outputFormat", "_page", "_offset"}
MODIFIERS = {
    "string": {"exact", "contains"},
    "token": {"not", "text", "of-type"},
    "date": set(),
    "number": set(),
    "quantity": set(),
    "uri": {"below", "above"},
    "reference": {"identifier"},   # plus :Type
    "composite": set(),
}


class Registry:
    def __init__(self, path):
        with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path) as f:
            bundle = json.load(f)
        self.by_base = {}
        self.by_url = {}
        self.codes_by_base = {}
        for e in bundle.get("entry", []):
            r = e.get("resource", {})
            if r.get("resourceType") != "SearchParameter":
                continue
            url = r.get("url") or e.get("fullUrl")
            if url:
                self.by_url[url] = r
            for b in r.get("base", []):
                self.by_base[(b, r["code"])] = r
                self.codes_by_base.setdefault(b, set()).add(r["code"])

    def lookup(self, rtype, code):
        for b in (rtype, "DomainResource", "Resource"):
            sp = self.by_base.get((b, code))
            if sp is not None:
                return sp
        return None

    def codes(self, rtype):
        """The codes of every parameter that lookup(rtype, code) finds."""
        out = set()
        for b in (rtype, "DomainResource", "Resource"):
            out |= self.codes_by_base.get(b, set())
        return out


def load_data(directory, last_updated):
    by_type = {}
    files = sorted(glob.glob(os.path.join(directory, "*.ndjson.gz")))
    if not files:
        raise SystemExit("no *.ndjson.gz in %s" % directory)
    for fn in files:
        with gzip.open(fn, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                r = json.loads(line, parse_float=Decimal)
                if last_updated is not None:
                    r.setdefault("meta", {})["lastUpdated"] = last_updated
                by_type.setdefault(r["resourceType"], {})[r["id"]] = r   # a later line wins
    return {t: [rs[i] for i in sorted(rs)] for t, rs in by_type.items()}


SYSTEM_TYPE_NAMES = {"System.String": "string", "System.Boolean": "boolean", "System.Decimal": "decimal",
                     "System.Integer": "integer", "System.Date": "date", "System.DateTime": "dateTime",
                     "System.Time": "time"}


class Evaluator:
    def __init__(self, data, registry, last_updated="file"):
        import fhirpathpy
        from fhirpathpy.engine.nodes import ResourceNode
        from fhirpathpy.models import models
        self.fp = fhirpathpy
        self.ResourceNode = ResourceNode
        self.model = models["r4"]
        self.data = data
        self.registry = registry
        self.last_updated = last_updated    # "now", "file" or an instant: how meta.lastUpdated was set
        self.index = {t: {r["id"]: i for i, r in enumerate(rs)} for t, rs in data.items()}
        self.cache = {}
        self.compiled = {}
        t2p = self.model["type2Parent"]

        def is_resource(t):
            seen = set()
            while t in t2p and t not in seen:
                seen.add(t)
                t = t2p[t]
                if t == "Resource":
                    return True
            return False
        self.resource_types = {t for t in t2p if is_resource(t)} | {"Resource", "DomainResource"}
        self.resource_types -= {"DomainResource", "Resource"}

    def compile(self, expr):
        f = self.compiled.get(expr)
        if f is None:
            f = self.fp.compile(expr, model=self.model, options={"returnRawData": True})
            self.compiled[expr] = f
        return f

    def typed(self, item):
        """(FHIR type name, raw data) of one fhirpathpy result, or None for an empty node."""
        if isinstance(item, self.ResourceNode):
            data = item.data
            if data is None:
                return None
            t = item.path
            if t is None:
                raise Unsupported("a FHIRPath result of unknown type")
            if t in SYSTEM_TYPE_NAMES:
                t = SYSTEM_TYPE_NAMES[t]
            elif "." in t:
                t = self.model["path2Type"].get(t, "BackboneElement")
            return (t, data)
        if isinstance(item, bool):
            return ("boolean", item)
        if isinstance(item, str):
            return ("string", item)
        if isinstance(item, int):
            return ("integer", item)
        if isinstance(item, (Decimal, float)):
            return ("decimal", as_decimal(item))
        raise Unsupported("a FHIRPath result of type %s" % type(item).__name__)

    def run(self, f, root, resource, filt):
        try:
            res = f(root)
        except Unsupported:
            raise
        except Exception as e:  # fhirpathpy could not evaluate it: refuse, don't guess
            raise Unsupported("fhirpathpy failed: %s" % e)
        out = []
        for item in res:
            tv = self.typed(item)
            if tv is None:
                continue
            if filt is not None:
                if tv[0] != "Reference" or reference_type(tv[1].get("reference"), resource) != filt:
                    continue
            out.append(tv)
        return out

    def part_values(self, rtype, expr, filt):
        """Per resource of rtype (in order), the typed values of one expression part. Cached."""
        key = ("part", rtype, expr, filt)
        if key not in self.cache:
            f = self.compile(expr)
            self.cache[key] = [self.run(f, r, r, filt) for r in self.data.get(rtype, [])]
        return self.cache[key]

    def param_values(self, rtype, sp):
        key = ("param", rtype, sp["code"])
        if key not in self.cache:
            parts = parts_for_type(sp, rtype)
            per_part = [self.part_values(rtype, e, flt) for e, flt in parts]
            n = len(self.data.get(rtype, []))
            vals = [[v for pv in per_part for v in pv[i]] for i in range(n)]
            types = {v[0] for vs in vals for v in vs}
            self.cache[key] = (vals, types)
        return self.cache[key]

    def check_identifier_only_references(self, rtype, sp):
        """For :identifier: refuses when a part's .where(resolve() is T) filter drops a Reference that has
        an identifier but no `reference`. resolve() finds nothing for it, so the R4 expression leaves it
        out, while the modifier exists to find such references: which one the spec means is not settled."""
        for expr, filt in parts_for_type(sp, rtype):
            if filt is None:
                continue
            for vs in self.part_values(rtype, expr, None):
                for ftype, data in vs:
                    if ftype == "Reference" and not isinstance(data.get("reference"), str) \
                            and isinstance(data.get("identifier"), dict):
                        raise Unsupported(":identifier on %r, whose resolve() filter drops a reference that "
                                          "has only an identifier" % sp["code"])

    def roots(self, rtype, expr):
        """Per resource, the raw items of a composite's expression part. Cached."""
        key = ("roots", rtype, expr)
        if key not in self.cache:
            f = self.compile(expr)
            out = []
            for r in self.data.get(rtype, []):
                try:
                    out.append(list(f(r)))
                except Exception as e:
                    raise Unsupported("fhirpathpy failed: %s" % e)
            self.cache[key] = out
        return self.cache[key]

    def component_values(self, rtype, root_expr, cexpr, cfilt):
        """Per resource, per root item, the typed values of a component expression. Cached."""
        key = ("component", rtype, root_expr, cexpr, cfilt)
        if key not in self.cache:
            f = self.compile(cexpr)
            roots = self.roots(rtype, root_expr)
            self.cache[key] = [[self.run(f, root, r, cfilt) for root in rs]
                               for r, rs in zip(self.data.get(rtype, []), roots)]
        return self.cache[key]

    def composite_values(self, rtype, sp):
        """Per resource, a list of items; each item a list (one per component) of typed values."""
        key = ("composite", rtype, sp["code"])
        if key not in self.cache:
            parts = parts_for_type(sp, rtype)
            comps = []
            for c in sp.get("component", []):
                csp = self.registry.by_url.get(c.get("definition"))
                if csp is None:
                    raise Unsupported("composite component %r not found" % c.get("definition"))
                cexpr, cfilt = rewrite_part(c["expression"])
                comps.append((csp, cexpr, cfilt))
            if len(comps) < 2:
                raise Unsupported("composite %r without components" % sp["code"])
            n = len(self.data.get(rtype, []))
            per_resource = [[] for _ in range(n)]
            types = [set() for _ in comps]
            for expr, filt in parts:
                if filt is not None:
                    raise Unsupported("resolve() in a composite's expression")
                cvals = [self.component_values(rtype, expr, ce, cf) for _, ce, cf in comps]
                for i in range(n):
                    for j in range(len(cvals[0][i])):
                        item = [cv[i][j] for cv in cvals]
                        for k, vs in enumerate(item):
                            types[k].update(v[0] for v in vs)
                        per_resource[i].append(item)
            self.cache[key] = (per_resource, comps, types)
        return self.cache[key]


def make_matcher(sptype, raw, modifier, sp, ev, now_ns):
    if sptype == "string":
        return StringMatcher(raw, modifier)
    if sptype == "token":
        return TokenMatcher(raw, modifier)
    if sptype == "date":
        return DateMatcher(raw, modifier, now_ns)
    if sptype == "number":
        return NumberMatcher(raw, modifier)
    if sptype == "quantity":
        return QuantityMatcher(raw, modifier)
    if sptype == "reference":
        return ReferenceMatcher(raw, modifier, sp.get("target", []), ev.resource_types)
    if sptype == "uri":
        return UriMatcher(raw, modifier)
    raise Unsupported("parameter type %s" % sptype)


def eval_param(ev, rtype, name, raw_value, now_ns):
    """The set of indices (into ev.data[rtype]) of the resources that match one name=value."""
    if "." in name:
        raise Unsupported("chained parameter %r" % name)
    code, _, modifier = name.partition(":")
    if code in RESULT_PARAMS or code.startswith("_has"):
        raise Unsupported("parameter %r is not supported by the oracle" % code)
    sp = ev.registry.lookup(rtype, code)
    if sp is None:
        raise Unsupported("unknown parameter %r for %s" % (code, rtype))
    sptype = sp["type"]
    if sptype not in MODIFIERS:
        raise Unsupported("parameter type %s" % sptype)
    n = len(ev.data.get(rtype, []))
    if raw_value == "":
        raise Unsupported("empty value")

    if modifier == "missing":
        if sptype == "composite":
            raise Unsupported(":missing on a composite parameter")
        vals, _ = ev.param_values(rtype, sp)
        out = set()
        for v in split_unescaped(raw_value, ","):
            v = unescape(v)
            if v not in ("true", "false"):
                raise Unsupported(":missing value must be true or false")
            out |= {i for i in range(n) if (not vals[i]) == (v == "true")}
        return out

    if modifier:
        allowed = MODIFIERS[sptype]
        if sptype == "reference":
            if modifier not in allowed and modifier not in ev.resource_types:
                raise Unsupported("modifier :%s on a reference parameter" % modifier)
        elif modifier not in allowed:
            raise Unsupported("modifier :%s on a %s parameter" % (modifier, sptype))

    or_values = split_unescaped(raw_value, ",")
    if modifier == "not" and len(or_values) > 1:
        raise Unsupported(":not with several values (NOT of the OR, or OR of the NOTs, is not settled)")

    if sptype == "composite":
        per_resource, comps, types = ev.composite_values(rtype, sp)
        result = set()
        for ov in or_values:
            pieces = split_unescaped(ov, "$")
            if len(pieces) != len(comps):
                raise Unsupported("composite value needs %d parts separated by $" % len(comps))
            matchers = []
            for (csp, _, _), piece, ctypes in zip(comps, pieces, types):
                if csp["type"] == "composite":
                    raise Unsupported("nested composite")
                m = make_matcher(csp["type"], piece, "", csp, ev, now_ns)
                for t in sorted(ctypes):
                    m.check_type(t)
                matchers.append(m)
            for i in range(n):
                if any(all(m(vs) for m, vs in zip(matchers, item)) for item in per_resource[i]):
                    result.add(i)
        return result

    if sptype == "reference" and modifier == "identifier":
        ev.check_identifier_only_references(rtype, sp)
    vals, types = ev.param_values(rtype, sp)
    result = set()
    for ov in or_values:
        m = make_matcher(sptype, ov, "" if modifier == "not" else modifier, sp, ev, now_ns)
        for t in sorted(types):
            m.check_type(t)
        result |= {i for i in range(n) if m(vals[i])}
    if modifier == "not":
        result = set(range(n)) - result
    return result


# --------------------------------------------------------------------------------------------------
# _sort (search.html#sort). R4 leaves the order of a resource with several values to the server; the
# oracle applies the server's documented order, stated in README.md: one sort value per resource and
# key (the minimum ascending, the maximum descending), resources without a value last in both
# directions, then the next key, then the id.

def sort_fold(s):
    """The fold used to sort strings: NFD, U+0300..U+036F dropped, then lower()."""
    s = unicodedata.normalize("NFD", s)
    return "".join(c for c in s if not 0x300 <= ord(c) <= 0x36F).lower()


SORT_TYPES = {"string", "token", "date", "number", "quantity", "reference", "uri"}


def sort_check_type(sptype, ftype):
    if sptype == "string":
        string_parts(ftype, {})  # raises when unsupported
        return
    ok = {"token": SYSTEM_TYPES | SYSTEMLESS_TYPES,
          "date": DATE_PRIMITIVES | {"Period", "Timing"},
          "number": NUMBER_TYPES,
          "quantity": QUANTITY_TYPES,
          "reference": {"Reference"},
          "uri": URI_TYPES}[sptype]
    if ftype not in ok:
        raise Unsupported("_sort on a %s parameter with a %s value" % (sptype, ftype))


def sort_candidates(sptype, values, descending):
    """Everything one resource's values offer for one sort key; its sort value is their min or max."""
    out = []
    for ftype, data in values:
        if sptype == "string":
            out.extend(sort_fold(s) for s in string_parts(ftype, data))
        elif sptype == "token":
            if ftype in SYSTEM_TYPES:
                out.extend(c for _, c in token_codings(ftype, data) if isinstance(c, str))
            else:
                c = token_plain(ftype, data)
                if isinstance(c, str):
                    out.append(c)
        elif sptype == "date":
            # ascending: the lowest start; descending: the highest end
            out.extend(hi if descending else lo for lo, hi in date_ranges(ftype, data))
        elif sptype == "number":
            d = as_decimal(data)
            if d is not None:
                out.append(d)
        elif sptype == "quantity":
            d = as_decimal(data.get("value"))
            if d is not None:
                out.append(d)
        elif sptype == "reference":
            ref = data.get("reference")
            if isinstance(ref, str):
                p = parse_stored_reference(ref)
                out.append("%s/%s" % (p[1], p[2]) if p[0] == "local" else ref)
        elif sptype == "uri":
            if isinstance(data, str):
                out.append(data)
        else:
            raise AssertionError(sptype)
    return out


def sort_value(sptype, values, descending):
    """The one value a resource sorts by for one key, or None when it has none."""
    c = sort_candidates(sptype, values, descending)
    if not c:
        return None
    return max(c) if descending else min(c)


def parse_sort(ev, rtype, raws):
    """[(code, SearchParameter, descending)] of the _sort parameter's values."""
    if len(raws) > 1:
        raise Unsupported("_sort given more than once")
    keys = []
    for k in raws[0].split(","):
        desc = k.startswith("-")
        code = k[1:] if desc else k
        if code == "":
            raise Unsupported("empty _sort key")
        sp = ev.registry.lookup(rtype, code)
        if sp is None:
            raise Unsupported("_sort on unknown parameter %r for %s" % (code, rtype))
        if sp["type"] not in SORT_TYPES:
            raise Unsupported("_sort on a %s parameter (%r)" % (sp["type"], code))
        if code == "_lastUpdated" and ev.last_updated == "now":
            raise Unsupported("_sort=_lastUpdated with --last-updated now: the order depends on when the "
                              "server stamped each resource")
        keys.append((code, sp, desc))
    return keys


def sort_compare(columns, ids, a, b):
    """cmp of resources a and b (indices): key by key, no value last, then the id."""
    for col, desc in columns:
        va, vb = col[a], col[b]
        if va is None or vb is None:
            if va is None and vb is None:
                continue
            return 1 if va is None else -1
        if va != vb:
            r = -1 if va < vb else 1
            return -r if desc else r
    return (ids[a] > ids[b]) - (ids[a] < ids[b])


def sort_order(ev, rtype, selected, keys):
    rs = ev.data.get(rtype, [])
    ids = [r["id"] for r in rs]
    columns = []
    for _, sp, desc in keys:
        vals, types = ev.param_values(rtype, sp)
        for t in sorted(types):
            sort_check_type(sp["type"], t)
        columns.append(({i: sort_value(sp["type"], vals[i], desc) for i in selected}, desc))
    order = sorted(selected, key=functools.cmp_to_key(lambda a, b: sort_compare(columns, ids, a, b)))
    return [ids[i] for i in order]


# --------------------------------------------------------------------------------------------------
# _include and _revinclude (search.html#include), over all the matches.

INCLUDE_NAMES = {"_include": (False, False), "_include:iterate": (False, True),
                 "_revinclude": (True, False), "_revinclude:iterate": (True, True)}
MAX_INCLUDE_ROUNDS = 4   # the first round and at most 3 :iterate rounds


def parse_include(ev, name, raw):
    """(reverse, iterate, Source, [SearchParameter], Target or None) of one _include/_revinclude."""
    if name not in INCLUDE_NAMES:
        raise Unsupported("%r is not supported (only _include, _revinclude and their :iterate)" % name)
    rev, iterate = INCLUDE_NAMES[name]
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise Unsupported("%s value %r is not Source:param[:Target]" % (name, raw))
    source, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if source not in ev.resource_types:
        raise Unsupported("%s: unknown resource type %r" % (name, source))
    if target is not None and target not in ev.resource_types:
        raise Unsupported("%s: unknown target type %r" % (name, target))
    if code == "*":
        if target is not None:
            raise Unsupported("%s: Source:*:Target" % name)
        sps = [ev.registry.lookup(source, c) for c in sorted(ev.registry.codes(source))]
        sps = [sp for sp in sps if sp["type"] == "reference"]
    else:
        sp = ev.registry.lookup(source, code)
        if sp is None:
            raise Unsupported("%s: unknown parameter %r for %s" % (name, code, source))
        if sp["type"] != "reference":
            raise Unsupported("%s: %s:%s is a %s parameter, not a reference"
                              % (name, source, code, sp["type"]))
        if target is not None and target not in sp.get("target", []):
            raise Unsupported("%s: %s is not a target of %s:%s" % (name, target, source, code))
        sps = [sp]
    return rev, iterate, source, sps, target


def reference_index(ev, rtype, sp):
    """Per resource of rtype, the relative (Type, id) its parameter sp references (after the resolve
    filter), and the reverse map (Type, id) -> indices. Absolute, contained and urn: references are
    left out: they bring nothing in. Cached."""
    key = ("refs", rtype, sp["code"])
    if key not in ev.cache:
        vals, types = ev.param_values(rtype, sp)
        for t in sorted(types):
            if t != "Reference":
                raise Unsupported("include through %s:%s, which has a %s value" % (rtype, sp["code"], t))
        fwd, back = [], {}
        for i, vs in enumerate(vals):
            refs = []
            for _, data in vs:
                ref = data.get("reference")
                if isinstance(ref, str):
                    p = parse_stored_reference(ref)
                    if p[0] == "local":
                        refs.append((p[1], p[2]))
                        back.setdefault((p[1], p[2]), set()).add(i)
            fwd.append(refs)
        ev.cache[key] = (fwd, back)
    return ev.cache[key]


def apply_includes(ev, incs, frontier):
    """The (Type, id) that the includes bring in from the resources of frontier (a set of (Type, id))."""
    out = set()
    for rev, _, source, sps, target in incs:
        for sp in sps:
            fwd, back = reference_index(ev, source, sp)
            if rev:
                for t, i in frontier:
                    if target is None or t == target:
                        out.update((source, ev.data[source][j]["id"]) for j in back.get((t, i), ()))
            else:
                idx = ev.index.get(source, {})
                for t, i in frontier:
                    if t != source:
                        continue
                    for tt, ti in fwd[idx[i]]:
                        if (target is None or tt == target) and ti in ev.index.get(tt, {}):
                            out.add((tt, ti))
    return out


def include_closure(ev, matches, incs):
    """Sorted "Type/id" of the resources that are not matches and that the includes bring in: all of
    them on the matches, then the :iterate ones on what the previous round added, until nothing is
    new (refused if a round beyond MAX_INCLUDE_ROUNDS would still add something)."""
    known = set(matches)
    new = apply_includes(ev, incs, known) - known
    included = set(new)
    known |= new
    iterates = [inc for inc in incs if inc[1]]
    rounds = 1
    while iterates and new:
        new = apply_includes(ev, iterates, new) - known
        if not new:
            break
        rounds += 1
        if rounds > MAX_INCLUDE_ROUNDS:
            raise Unsupported(":iterate still adds resources after %d rounds" % MAX_INCLUDE_ROUNDS)
        included |= new
        known |= new
    return sorted("%s/%s" % x for x in included)


# --------------------------------------------------------------------------------------------------
# Queries

def search(ev, query, now_ns):
    """The answer's fields: "ids" (sorted), and "ordered" with _sort, "included" with includes."""
    rtype, _, qs = query.partition("?")
    if rtype not in ev.resource_types:
        raise Unsupported("unknown resource type %r" % rtype)
    n = len(ev.data.get(rtype, []))
    selected = set(range(n))
    sorts, incs = [], []
    for piece in qs.split("&"):
        if piece == "":
            continue
        if "=" not in piece:
            raise Unsupported("parameter without '=': %r" % piece)
        name, _, value = piece.partition("=")
        name, value = unquote_plus(name), unquote_plus(value)
        code = name.partition(":")[0]
        if code == "_sort":
            if name != code:
                raise Unsupported("modifier on _sort: %r" % name)
            sorts.append(value)
        elif code in ("_include", "_revinclude"):
            incs.append(parse_include(ev, name, value))
        else:
            selected &= eval_param(ev, rtype, name, value, now_ns)
    rs = ev.data.get(rtype, [])
    out = {"ids": sorted(rs[i]["id"] for i in selected)}
    if sorts:
        out["ordered"] = sort_order(ev, rtype, selected, parse_sort(ev, rtype, sorts))
    if incs:
        out["included"] = include_closure(ev, {(rtype, rs[i]["id"]) for i in selected}, incs)
    return out


def run_query(ev, query, now_ns):
    return search(ev, query, now_ns)["ids"]


DEFAULT_PARAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fhir-r4",
                              "search-parameters.pristine-4.0.1.json.gz")


def instant_now():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="directory of *.ndjson.gz files")
    ap.add_argument("--params", help="the R4 SearchParameter Bundle (JSON, may be gzipped)")
    ap.add_argument("--queries", help="queries file: feature<TAB>Type?query per line")
    ap.add_argument("--last-updated", default="now",
                    help="meta.lastUpdated given to every resource, as a server does on load: 'now' (the "
                         "default), an instant, or 'file' to keep what the files say")
    ap.add_argument("--now", help="the instant 'now' for the ap prefix on dates (default: the clock)")
    ap.add_argument("--self-test", action="store_true", help="run the oracle's own checks of its rules")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args.params or DEFAULT_PARAMS)
    if not (args.data and args.params and args.queries):
        ap.error("--data, --params and --queries are needed")

    now = args.now or instant_now()
    now_ns = date_range(now)[0]
    lu = None if args.last_updated == "file" else (now if args.last_updated == "now" else args.last_updated)
    if lu is not None:
        date_range(lu)
    data = load_data(args.data, lu)
    ev = Evaluator(data, Registry(args.params),
                   last_updated="now" if args.last_updated == "now" else "file" if lu is None else lu)
    out = sys.stdout
    with open(args.queries, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            feature, tab, query = line.partition("\t")
            if not tab:
                query = line
            query = query.strip()
            try:
                obj = dict({"query": query}, **search(ev, query, now_ns))
            except Unsupported as e:
                obj = {"query": query, "error": str(e)}
            out.write(json.dumps(obj) + "\n")
    return 0


# --------------------------------------------------------------------------------------------------
# Self-tests of the matching rules (no fhirpathpy needed).

def self_test(params_path):
    failures = []
    count = [0]

    def check(name, got, want):
        count[0] += 1
        if got != want:
            failures.append("%s: got %r, want %r" % (name, got, want))

    def raises(name, fn):
        count[0] += 1
        try:
            fn()
        except Unsupported:
            return
        failures.append("%s: did not refuse" % name)

    # escaping
    check("split or", split_unescaped(r"a,b\,c,d", ","), ["a", r"b\,c", "d"])
    check("unescape", unescape(r"b\,c\|d\$e\\f"), "b,c|d$e\\f")
    check("split bar keeps escapes", split_unescaped(r"s\|x|c", "|"), [r"s\|x", "c"])
    check("escaped backslash then sep", split_unescaped("a\\\\,b", ","), ["a\\\\", "b"])
    raises("unknown escape", lambda: unescape(r"a\n"))
    raises("trailing backslash", lambda: split_unescaped("a\\", ","))

    # strings: accents, case, exact, contains
    check("accent starts-with", string_match("", "maria", "María Teresa"), True)
    check("accent in search", string_match("", "Ramón", "ramon"), True)
    check("case", string_match("", "SMI", "Smith"), True)
    check("not prefix", string_match("", "mith", "Smith"), False)
    check("exact same", string_match("exact", "María Teresa", "María Teresa"), True)
    check("exact accent", string_match("exact", "Maria Teresa", "María Teresa"), False)
    check("exact case", string_match("exact", "smith", "Smith"), False)
    check("exact prefix", string_match("exact", "Smi", "Smith"), False)
    check("contains", string_match("contains", "TERE", "María Teresa"), True)
    check("contains accent", string_match("contains", "ía t", "Maria Teresa"), True)
    check("sharp s", string_match("", "strasse", "Straße"), True)
    check("humanname parts", sorted(string_parts("HumanName", {"family": "F", "given": ["G1", "G2"],
                                                              "prefix": ["Dr."], "use": "official"})),
          ["Dr.", "F", "G1", "G2"])
    check("address parts", sorted(string_parts("Address", {"line": ["1 St"], "city": "C", "use": "home",
                                                          "postalCode": "01"})), ["01", "1 St", "C"])

    # tokens
    cc = ("CodeableConcept", {"coding": [{"system": "http://loinc.org", "code": "8302-2", "display": "Body Height"}],
                              "text": "Height"})
    check("token code", TokenMatcher("8302-2", "")([cc]), True)
    check("token system|code", TokenMatcher("http://loinc.org|8302-2", "")([cc]), True)
    check("token wrong system", TokenMatcher("http://snomed.info/sct|8302-2", "")([cc]), False)
    check("token system|", TokenMatcher("http://loinc.org|", "")([cc]), True)
    check("token |code with system", TokenMatcher("|8302-2", "")([cc]), False)
    check("token |code no system", TokenMatcher("|X", "")([("Coding", {"code": "X"})]), True)
    check("token case-sensitive", TokenMatcher("abc", "")([("Coding", {"code": "ABC"})]), False)
    check("token escaped bar", TokenMatcher(r"a\|b", "")([("Coding", {"code": "a|b"})]), True)
    check("token text display", TokenMatcher("body h", "text")([cc]), True)
    check("token text cc.text", TokenMatcher("héight", "text")([cc]), True)
    check("token text not substring", TokenMatcher("height", "text")([("Coding", {"display": "Body Height"})]), False)
    check("identifier", TokenMatcher("urn:x|42", "")([("Identifier", {"system": "urn:x", "value": "42"})]), True)
    check("boolean", TokenMatcher("false", "")([("boolean", False)]), True)
    check("contactpoint", TokenMatcher("555-1", "")([("ContactPoint", {"system": "phone", "value": "555-1"})]), True)
    raises("system on code", lambda: TokenMatcher("s|male", "").check_type("code"))
    raises("boolean non-boolean", lambda: TokenMatcher("yes", "").check_type("boolean"))
    raises("text on code", lambda: TokenMatcher("m", "text").check_type("code"))

    # token :of-type: system|code|value on Identifier.type.coding and Identifier.value
    v2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    mr = ("Identifier", {"system": "urn:h", "value": "42", "type": {"coding": [
        {"system": "urn:other", "code": "X"}, {"system": v2, "code": "MR", "display": "Medical record"}],
        "text": "MRN"}})
    check("of-type", TokenMatcher(v2 + "|MR|42", "of-type")([mr]), True)
    check("of-type second coding", TokenMatcher("urn:other|X|42", "of-type")([mr]), True)
    check("of-type mixed codings", TokenMatcher("urn:other|MR|42", "of-type")([mr]), False)
    check("of-type wrong code", TokenMatcher(v2 + "|SS|42", "of-type")([mr]), False)
    check("of-type code case", TokenMatcher(v2 + "|mr|42", "of-type")([mr]), False)
    check("of-type wrong value", TokenMatcher(v2 + "|MR|4", "of-type")([mr]), False)
    check("of-type value is not the system", TokenMatcher(v2 + "|MR|urn:h", "of-type")([mr]), False)
    check("of-type untyped", TokenMatcher(v2 + "|MR|42", "of-type")([("Identifier", {"value": "42"})]), False)
    check("of-type type text only", TokenMatcher(v2 + "|MR|42", "of-type")(
        [("Identifier", {"value": "42", "type": {"text": "MR"}})]), False)
    check("of-type any identifier", TokenMatcher(v2 + "|MR|42", "of-type")(
        [("Identifier", {"value": "1"}), mr]), True)
    check("of-type escapes", TokenMatcher(r"urn:a\|b|C\,D|x\|y\$z\\", "of-type")(
        [("Identifier", {"value": "x|y$z\\", "type": {"coding": [{"system": "urn:a|b", "code": "C,D"}]}})]), True)
    check("of-type on a CodeableConcept", TokenMatcher("http://loinc.org|8302-2|8302-2", "of-type")([cc]), False)
    check("of-type on a Coding", TokenMatcher("s|c|c", "of-type")([("Coding", {"system": "s", "code": "c"})]), False)
    check("of-type on a string", TokenMatcher("s|c|v", "of-type")([("string", "v")]), False)
    check("of-type accepts any token type", TokenMatcher("s|c|v", "of-type").check_type("code"), None)
    raises("of-type two parts", lambda: TokenMatcher(v2 + "|MR", "of-type"))
    raises("of-type one part", lambda: TokenMatcher("42", "of-type"))
    raises("of-type four parts", lambda: TokenMatcher(v2 + "|MR|42|x", "of-type"))
    raises("of-type empty system", lambda: TokenMatcher("|MR|42", "of-type"))
    raises("of-type empty code", lambda: TokenMatcher(v2 + "||42", "of-type"))
    raises("of-type empty value", lambda: TokenMatcher(v2 + "|MR|", "of-type"))

    # dates: precision ranges
    jan = date_range("2013-01", search=True)
    check("month lo", jan[0], date_range("2013-01-01T00:00:00Z")[0])
    check("month hi", jan[1], date_range("2013-02-01T00:00:00Z")[0])
    check("year", date_range("1970"), (0, 365 * DAY))
    check("leap feb", date_range("2012-02")[1] - date_range("2012-02")[0], 29 * DAY)
    check("dec", date_range("2012-12")[1], date_range("2013")[0])
    check("second", date_range("2011-02-02T16:30:49-05:00"),
          (date_range("2011-02-02T21:30:49Z")[0], date_range("2011-02-02T21:30:50Z")[0]))
    check("millis", date_range("2011-02-02T16:30:49.825-05:00")[1] - date_range("2011-02-02T16:30:49.825-05:00")[0],
          10 ** 6)
    check("minute search", date_range("2011-02-02T16:30Z", search=True)[1] - date_range("2011-02-02T16:30Z", search=True)[0],
          60 * NS)
    raises("invalid day", lambda: date_range("2013-02-30"))
    raises("stored no seconds", lambda: date_range("2013-02-03T10:00Z"))

    def dm(q, ftype, v, now="2025-01-01"):
        return DateMatcher(q, "", date_range(now)[0])([(ftype, v)])
    check("eq month contains instant", dm("2013-01", "instant", "2013-01-31T23:59:59.999Z"), True)
    check("eq month excludes next", dm("2013-01", "instant", "2013-02-01T00:00:00.000Z"), False)
    check("eq month excludes before", dm("2013-01", "instant", "2012-12-31T23:59:59.999Z"), False)
    check("eq tz shifts day", dm("2013-01-31", "dateTime", "2013-01-31T20:00:00-05:00"), False)
    check("eq tz shifts day 2", dm("2013-02-01", "dateTime", "2013-01-31T20:00:00-05:00"), True)
    check("eq year stored vs month search", dm("1970-01", "date", "1970"), False)
    check("ne", dm("ne1970-01", "date", "1970"), True)
    check("gt year stored overlaps", dm("gt1970-06", "date", "1970"), True)
    check("lt year stored overlaps", dm("lt1970-06", "date", "1970"), True)
    check("gt day boundary", dm("gt2013-01-01", "date", "2013-01-01"), False)
    check("ge day boundary", dm("ge2013-01-01", "date", "2013-01-01"), True)
    check("ge next day", dm("ge2013-01-01", "date", "2013-01-02"), True)
    check("ge before", dm("ge2013-01-01", "date", "2012-12-31"), False)
    check("le day boundary", dm("le2013-01-01", "date", "2013-01-01"), True)
    check("lt day boundary", dm("lt2013-01-01", "date", "2013-01-01"), False)
    check("gt second", dm("gt2013-01-01T00:00:00Z", "instant", "2013-01-01T00:00:01.000Z"), True)
    check("gt within the second", dm("gt2013-01-01T00:00:00Z", "instant", "2013-01-01T00:00:00.999Z"), False)
    check("eq within the second", dm("2013-01-01T00:00:00Z", "instant", "2013-01-01T00:00:00.999Z"), True)
    check("sa", dm("sa2013-01", "date", "2013-02-01"), True)
    check("sa overlap", dm("sa2013-01", "date", "2013-01-31"), False)
    check("eb", dm("eb2013-01", "date", "2012-12-31"), True)
    check("eb overlap", dm("eb2013-01", "date", "2013-01-01"), False)
    per = {"start": "2013-01-05T10:00:00Z", "end": "2013-01-06T10:00:00Z"}
    check("period eq", dm("2013-01", "Period", per), True)
    check("period eq day", dm("2013-01-05", "Period", per), False)
    check("period open end eq", dm("2013-01", "Period", {"start": "2013-01-05T10:00:00Z"}), False)
    check("period open end gt", dm("gt2030", "Period", {"start": "2013-01-05T10:00:00Z"}), True)
    check("period open end ge", dm("ge2030", "Period", {"start": "2013-01-05T10:00:00Z"}), True)
    check("period lt", dm("lt2013-01-06", "Period", per), True)
    check("ap near", dm("ap2015-01-01", "date", "2015-07-01", now="2025-01-01"), True)   # margin ~1 year
    check("ap far", dm("ap2015-01-01", "date", "2017-01-01", now="2025-01-01"), False)
    check("timing", dm("2013-01", "Timing", {"event": ["2014-01-01", "2013-01-09"]}), True)

    # numbers: implicit precision
    def nm(q, t):
        return NumberMatcher(q, "")([("decimal", Decimal(t))])
    check("100 eq 99.5", nm("100", "99.5"), True)
    check("100 eq 100.4999", nm("100", "100.4999"), True)
    check("100 eq 100.5", nm("100", "100.5"), False)
    check("100 eq 99.49", nm("100", "99.49"), False)
    check("100.00 eq 100.004", nm("100.00", "100.004"), True)
    check("100.00 eq 100.005", nm("100.00", "100.005"), False)
    check("100.00 eq 99.995", nm("100.00", "99.995"), True)
    check("ne100 99.7", nm("ne100", "99.7"), False)
    check("ne100 98", nm("ne100", "98"), True)
    check("gt100 100.1", nm("gt100", "100.1"), True)
    check("gt100 100", nm("gt100", "100"), False)
    check("ge100 100", nm("ge100", "100"), True)
    check("lt100 99.9", nm("lt100", "99.9"), True)
    check("le100 100.0", nm("le100", "100.0"), True)
    check("ap100 109", nm("ap100", "109"), True)
    check("ap100 111", nm("ap100", "111"), False)
    check("negative", nm("-1.5", "-1.54"), True)
    raises("exponent", lambda: NumberMatcher("1e2", ""))

    q = ("Quantity", {"value": Decimal("181.2"), "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"})
    check("quantity plain", QuantityMatcher("181.2", "")([q]), True)
    check("quantity precision in", QuantityMatcher("181", "")([q]), True)
    check("quantity precision out", QuantityMatcher("181.0", "")([q]), False)
    check("quantity precision out 2", QuantityMatcher("180", "")([q]), False)
    check("quantity system code", QuantityMatcher("gt181|http://unitsofmeasure.org|cm", "")([q]), True)
    check("quantity wrong code", QuantityMatcher("gt181|http://unitsofmeasure.org|mm", "")([q]), False)
    check("quantity ||unit", QuantityMatcher("181.2||cm", "")([q]), True)
    check("quantity ||unit by unit text", QuantityMatcher("181.2||centimetre", "")(
        [("Quantity", {"value": Decimal("181.2"), "unit": "centimetre", "code": "cm"})]), True)
    raises("quantity two parts", lambda: QuantityMatcher("1|x", ""))

    # references
    rt = {"Patient", "Group", "Observation", "Encounter"}
    ref = [("Reference", {"reference": "Patient/123"})]
    check("ref Type/id", ReferenceMatcher("Patient/123", "", ["Patient", "Group"], rt)(ref), True)
    check("ref bare id", ReferenceMatcher("123", "", ["Patient", "Group"], rt)(ref), True)
    check("ref bare id wrong targets", ReferenceMatcher("123", "", ["Group"], rt)(ref), False)
    check("ref :Type", ReferenceMatcher("123", "Patient", ["Patient", "Group"], rt)(ref), True)
    check("ref :Type other", ReferenceMatcher("123", "Group", ["Patient", "Group"], rt)(ref), False)
    check("ref absolute", ReferenceMatcher("http://h/fhir/Patient/123", "", ["Patient"], rt)(ref), True)
    check("ref versioned stored", ReferenceMatcher("Patient/123", "", ["Patient"], rt)(
        [("Reference", {"reference": "Patient/123/_history/2"})]), True)
    check("ref contained", ReferenceMatcher("123", "", ["Patient"], rt)([("Reference", {"reference": "#123"})]), False)
    # reference :identifier: a token search on Reference.identifier, which resolves nothing
    lid = [("Reference", {"identifier": {"system": "urn:mrn", "value": "m1"}, "type": "Patient"})]
    lid_nosys = [("Reference", {"identifier": {"value": "m1"}})]
    both = [("Reference", {"reference": "Patient/123", "identifier": {"system": "urn:mrn", "value": "m9"}})]

    def rid(v, values):
        return ReferenceMatcher(v, "identifier", ["Patient", "Group"], rt)(values)
    check("ref :identifier system|value", rid("urn:mrn|m1", lid), True)
    check("ref :identifier wrong system", rid("urn:x|m1", lid), False)
    check("ref :identifier wrong value", rid("urn:mrn|m2", lid), False)
    check("ref :identifier value case", rid("urn:mrn|M1", lid), False)
    check("ref :identifier value", rid("m1", lid), True)
    check("ref :identifier value, no system", rid("m1", lid_nosys), True)
    check("ref :identifier |value", rid("|m1", lid_nosys), True)
    check("ref :identifier |value with system", rid("|m1", lid), False)
    check("ref :identifier system|", rid("urn:mrn|", lid), True)
    check("ref :identifier system| no system", rid("urn:mrn|", lid_nosys), False)
    check("ref :identifier beside a reference", rid("urn:mrn|m9", both), True)
    check("ref :identifier not the literal reference", rid("Patient/123", ref), False)
    check("ref :identifier not the id", rid("123", ref), False)
    check("ref :identifier escapes", rid(r"urn:a\|b|m\,1", [("Reference", {"identifier": {"system": "urn:a|b", "value": "m,1"}})]),
          True)
    check("ref :identifier not a type", ReferenceMatcher("m1", "Patient", ["Patient"], rt)(lid), False)
    raises("ref :identifier |", lambda: ReferenceMatcher("|", "identifier", ["Patient"], rt))
    raises("ref :identifier two bars", lambda: ReferenceMatcher("a|b|c", "identifier", ["Patient"], rt))
    raises("ref :identifier on a canonical", lambda: ReferenceMatcher("m1", "identifier", [], rt).check_type("canonical"))
    check("resolve type", reference_type("Patient/1", {}), "Patient")
    check("resolve contained", reference_type("#c", {"contained": [{"resourceType": "Group", "id": "c"}]}), "Group")

    # uri
    u = [("uri", "http://acme.org/fhir/ValueSet/123")]
    check("uri exact", UriMatcher("http://acme.org/fhir/ValueSet/123", "")(u), True)
    check("uri below", UriMatcher("http://acme.org/fhir/", "below")(u), True)
    check("uri above", UriMatcher("http://acme.org/fhir/ValueSet/123/_history/5", "above")(u), True)
    check("uri not prefix", UriMatcher("http://acme.org/fhir/", "")(u), False)

    # _sort: one value per resource and key, missing last, then the id
    check("sort fold", sort_fold("María Ñandú"), "maria nandu")
    check("sort fold lower not casefold", sort_fold("Straße"), "straße")
    hn = ("HumanName", {"family": "Zed", "given": ["Ámy", "bob"], "prefix": ["Mr."]})
    check("sort string asc", sort_value("string", [hn], False), "amy")
    check("sort string desc", sort_value("string", [hn], True), "zed")
    check("sort token cc", sort_value("token", [cc, ("Coding", {"code": "1"})], False), "1")
    check("sort token desc", sort_value("token", [cc, ("Coding", {"code": "1"})], True), "8302-2")
    check("sort token no code", sort_value("token", [("Coding", {"display": "x"})], False), None)
    check("sort token boolean", sort_value("token", [("boolean", True)], False), "true")
    check("sort token identifier", sort_value("token", [("Identifier", {"system": "s", "value": "v"})], False), "v")
    day1, day2 = date_range("2013-01-01"), date_range("2013-01-02")
    check("sort date asc lo", sort_value("date", [("date", "2013-01-02"), ("date", "2013-01-01")], False), day1[0])
    check("sort date desc hi", sort_value("date", [("date", "2013-01-02"), ("date", "2013-01-01")], True), day2[1])
    check("sort date year vs day desc", sort_value("date", [("date", "2013")], True) >
          sort_value("date", [("date", "2013-12-31")], True), False)
    check("sort period open start", sort_value("date", [("Period", {"end": "2013"})], False), -INF)
    check("sort period open end", sort_value("date", [("Period", {"start": "2013"})], True), INF)
    check("sort period empty", sort_value("date", [("Period", {})], False), None)
    check("sort number", sort_value("number", [("decimal", Decimal("2.50")), ("integer", 3)], False), Decimal("2.5"))
    check("sort quantity", sort_value("quantity", [q], True), Decimal("181.2"))
    check("sort ref history", sort_value("reference", [("Reference", {"reference": "Patient/1/_history/2"})], False),
          "Patient/1")
    check("sort ref absolute", sort_value("reference", [("Reference", {"reference": "http://h/Patient/1"})], False),
          "http://h/Patient/1")
    check("sort ref no reference", sort_value("reference", [("Reference", {"display": "x"})], False), None)
    cols = [({0: None, 1: "b", 2: "a", 3: "b"}, False)]
    ids4 = ["w", "z", "y", "x"]
    order4 = lambda cs: [ids4[i] for i in sorted(range(4), key=functools.cmp_to_key(
        lambda a, b: sort_compare(cs, ids4, a, b)))]
    check("sort asc, missing last, ties by id", order4(cols), ["y", "x", "z", "w"])
    check("sort desc, missing last", order4([(cols[0][0], True)]), ["x", "z", "y", "w"])
    check("sort second key", order4([(cols[0][0], True), ({0: 1, 1: 1, 2: 1, 3: 2}, True)]), ["x", "z", "y", "w"])
    raises("sort composite type", lambda: sort_check_type("quantity", "Range"))

    # expressions
    check("split", split_top_level("A.b | (A.c as X) | B.d.where(x='|')"), ["A.b", "(A.c as X)", "B.d.where(x='|')"])
    check("rewrite as", rewrite_part("(Observation.value as Quantity)"), ("(Observation.value.ofType(Quantity))", None))
    check("rewrite .as", rewrite_part("value.as(DateTime)"), ("value.ofType(dateTime)", None))
    check("rewrite resolve", rewrite_part("Observation.subject.where(resolve() is Patient)"),
          ("Observation.subject", "Patient"))
    check("parts for type", parts_for_type({"code": "x", "base": ["A", "B"], "expression": "A.x | (B.y as Z)"}, "B"),
          [("(B.y.ofType(Z))", None)])
    check("common", parts_for_type({"code": "_id", "base": ["Resource"], "expression": "Resource.id"}, "Patient"),
          [("Patient.id", None)])

    # End to end, through fhirpathpy and the R4 SearchParameters, on a few made-up resources.
    try:
        import fhirpathpy  # noqa: F401
    except ImportError:
        fhirpathpy = None
        print("self-test: fhirpathpy not importable, end-to-end checks skipped")
    if fhirpathpy is not None and os.path.exists(params_path):
        def q(value):
            return {"system": "http://unitsofmeasure.org", "code": "mm[Hg]", "unit": "mm[Hg]", "value": Decimal(value)}
        loinc = "http://loinc.org"
        resources = [
            {"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["José"]}],
             "birthDate": "1970"},
            {"resourceType": "Patient", "id": "p2", "name": [{"family": "Mull"}], "birthDate": "1970-01-15"},
            {"resourceType": "Observation", "id": "o1", "status": "final",
             "code": {"coding": [{"system": loinc, "code": "8480-6"}]}, "subject": {"reference": "Patient/p1"},
             "effectiveDateTime": "2013-01-31T23:30:00-05:00", "valueQuantity": q("120")},
            {"resourceType": "Observation", "id": "o2", "status": "final",
             "code": {"coding": [{"system": loinc, "code": "85354-9"}]}, "subject": {"reference": "Group/g1"},
             "effectivePeriod": {"start": "2013-01-10T10:00:00Z"},
             "component": [{"code": {"coding": [{"system": loinc, "code": "8480-6"}]}, "valueQuantity": q("150")},
                           {"code": {"coding": [{"system": loinc, "code": "8462-4"}]}, "valueQuantity": q("90")}]},
            {"resourceType": "Observation", "id": "o3", "status": "final",
             "code": {"coding": [{"system": loinc, "code": "8302-2"}]}, "subject": {"reference": "Patient/p2"},
             "effectiveDateTime": "2013-01-31T12:00:00Z", "encounter": {"reference": "http://h/fhir/Encounter/e2"}},
            {"resourceType": "Patient", "id": "p3"},
            {"resourceType": "Organization", "id": "org1"},
        ]
        resources[2]["encounter"] = {"reference": "Encounter/e1"}
        # identifiers, for :of-type and :identifier
        v2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
        resources[0]["identifier"] = [
            {"system": "urn:mrn", "value": "m1", "type": {"coding": [{"system": v2, "code": "MR"}]}},
            {"system": "urn:ssn", "value": "s1"}]
        resources[1]["identifier"] = [
            {"system": "urn:ssn", "value": "s2", "type": {"coding": [{"system": v2, "code": "SS"}]}}]
        resources[2]["subject"]["identifier"] = {"system": "urn:mrn", "value": "m1"}
        resources += [
            {"resourceType": "Condition", "id": "c1", "subject": {"identifier": {"system": "urn:mrn", "value": "m2"}}},
            {"resourceType": "Condition", "id": "c2",
             "subject": {"reference": "Patient/p1", "identifier": {"system": "urn:mrn", "value": "m1"}}},
            {"resourceType": "Condition", "id": "c3", "subject": {"identifier": {"value": "m2"}}},
        ]
        resources[3]["encounter"] = {"reference": "#nothing"}
        # a chain of Encounters: e1 -> e2 -> ... -> e6 through partOf
        for k in range(1, 7):
            e = {"resourceType": "Encounter", "id": "e%d" % k, "status": "finished",
                 "class": {"code": "AMB"}, "subject": {"reference": "Patient/p%d" % (2 - k % 2)}}
            if k < 6:
                e["partOf"] = {"reference": "Encounter/e%d/_history/1" % (k + 1)}
            if k == 1:
                e["serviceProvider"] = {"reference": "Organization/org1"}
            resources.append(e)
        data = {}
        for r in resources:
            r.setdefault("meta", {})["lastUpdated"] = "2020-01-01T00:00:00.000Z"
            data.setdefault(r["resourceType"], []).append(r)
        ev = Evaluator(data, Registry(params_path))
        now_ns = date_range("2025-01-01")[0]
        cases = [
            ("Patient?family=muller", ["p1"]),
            ("Patient?family=MULL", ["p1", "p2"]),
            ("Patient?family:exact=Mull", ["p2"]),
            ("Patient?family:exact=Muller", []),
            ("Patient?given=jose", ["p1"]),
            ("Patient?name=jos%C3%A9", ["p1"]),
            ("Patient?birthdate=1970", ["p1", "p2"]),
            ("Patient?birthdate=1970-01", ["p2"]),
            ("Patient?birthdate=gt1970-06", ["p1"]),
            ("Patient?birthdate=ge1970-01-15", ["p1", "p2"]),
            ("Patient?birthdate=gt1970-01-15", ["p1"]),
            ("Observation?date=2013-01", ["o3"]),
            ("Observation?date=2013-02", ["o1"]),
            ("Observation?date=2013-02-01", ["o1"]),
            ("Observation?date=gt2013-06", ["o2"]),
            ("Observation?subject=p1", ["o1"]),
            ("Observation?subject=g1", ["o2"]),
            ("Observation?patient=g1", []),
            ("Observation?patient:missing=true", ["o2"]),
            ("Observation?subject:Group=g1", ["o2"]),
            ("Observation?code:not=8480-6", ["o2", "o3"]),
            ("Observation?combo-code=8480-6", ["o1", "o2"]),
            ("Observation?value-quantity:missing=true", ["o2", "o3"]),
            ("Observation?component-code-value-quantity=8480-6%24gt140", ["o2"]),
            ("Observation?component-code-value-quantity=8462-4%24gt140", []),
            ("Observation?combo-code-value-quantity=8480-6%24120", ["o1"]),
            ("Observation?combo-code-value-quantity=8480-6%24150%7Chttp%3A%2F%2Funitsofmeasure.org%7Cmm%5BHg%5D", ["o2"]),
            ("Observation?code=8302-2,8480-6&date=2013-01", ["o3"]),
            ("Observation?_id=o1,o3", ["o1", "o3"]),
            ("Observation?_lastUpdated=2020", ["o1", "o2", "o3"]),
            ("Patient?identifier:of-type=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fv2-0203%7CMR%7Cm1", ["p1"]),
            ("Patient?identifier:of-type=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fv2-0203%7CSS%7Cm1", []),
            ("Patient?identifier:of-type=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fv2-0203%7CSS%7Cs1", []),
            ("Patient?identifier:of-type=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fv2-0203%7CMR%7Cm1,"
             "http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fv2-0203%7CSS%7Cs2", ["p1", "p2"]),
            ("Patient?identifier:of-type=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fv2-0203%7CMR", "refused"),
            ("Patient?identifier:of-type=%7CMR%7Cm1", "refused"),
            ("Observation?code:of-type=http%3A%2F%2Floinc.org%7C8480-6%7C8480-6", []),
            ("Condition?subject:identifier=urn%3Amrn%7Cm1", ["c2"]),
            ("Condition?subject:identifier=m2", ["c1", "c3"]),
            ("Condition?subject:identifier=%7Cm2", ["c3"]),
            ("Condition?subject:identifier=urn%3Amrn%7C", ["c1", "c2"]),
            ("Condition?subject:identifier=urn%3Amrn%7Cm1,%7Cm2", ["c2", "c3"]),
            ("Condition?subject:identifier=Patient%2Fp1", []),
            ("Condition?subject=Patient%2Fp1", ["c2"]),
            ("Condition?subject:identifier=%7C", "refused"),
            ("Condition?patient:identifier=urn%3Amrn%7Cm1", "refused"),   # c1 has no reference for resolve()
            ("Observation?patient:identifier=urn%3Amrn%7Cm1", ["o1"]),
            ("Observation?subject:identifier=urn%3Assn%7Cs1", []),          # p1's own identifier: not resolved
            ("Observation?subject:identifier=urn%3Amrn%7Cm1&subject=Patient%2Fp2", []),
        ]
        for query, want in cases:
            count[0] += 1
            try:
                got = run_query(ev, query, now_ns)
            except Unsupported as e:
                got = "refused" if want == "refused" else "error: %s" % e
            if got != want:
                failures.append("%s: got %r, want %r" % (query, got, want))

        # (query, field of the answer, want); want None: refused
        field_cases = [
            ("Patient?_sort=family", "ordered", ["p2", "p1", "p3"]),          # mull < muller; no name last
            ("Patient?_sort=-family", "ordered", ["p1", "p2", "p3"]),
            ("Patient?_sort=given", "ordered", ["p1", "p2", "p3"]),
            ("Patient?_sort=birthdate", "ordered", ["p1", "p2", "p3"]),       # 1970 starts first
            ("Patient?_sort=-birthdate", "ordered", ["p1", "p2", "p3"]),      # and ends last
            ("Patient?_sort=_lastUpdated", "ordered", ["p1", "p2", "p3"]),    # all equal: by id
            ("Patient?family=mull&_sort=-_id", "ordered", ["p2", "p1"]),
            ("Patient?family=mull&_sort=-_id", "ids", ["p1", "p2"]),
            ("Observation?_sort=date", "ordered", ["o2", "o3", "o1"]),
            ("Observation?_sort=-date", "ordered", ["o2", "o1", "o3"]),       # o2's period has no end
            ("Observation?_sort=value-quantity", "ordered", ["o1", "o2", "o3"]),
            ("Observation?_sort=-value-quantity", "ordered", ["o1", "o2", "o3"]),
            ("Observation?_sort=subject", "ordered", ["o2", "o1", "o3"]),     # Group/g1 < Patient/p1
            ("Observation?_sort=patient,-_id", "ordered", ["o1", "o3", "o2"]),
            ("Observation?_sort=-patient,-_id", "ordered", ["o3", "o1", "o2"]),
            ("Observation?_sort=status,-_id", "ordered", ["o3", "o2", "o1"]),
            ("Observation?_sort=-code", "ordered", ["o2", "o1", "o3"]),
            ("Observation?_sort=code-value-quantity", "ordered", None),
            ("Observation?_sort=foo", "ordered", None),
            ("Patient?_sort=", "ordered", None),
            ("Patient?_sort=family&_sort=given", "ordered", None),
            ("Patient?_sort:asc=family", "ordered", None),
            ("Observation?_include=Observation:encounter", "included", ["Encounter/e1"]),
            ("Observation?_include=Observation:subject", "included", ["Patient/p1", "Patient/p2"]),
            ("Observation?_include=Observation:subject:Group", "included", []),   # Group/g1 is not in the data
            ("Observation?code=8480-6&_include=Observation:patient", "included", ["Patient/p1"]),
            ("Observation?_include=Patient:link", "included", []),
            ("Patient?_id=p1&_revinclude=Observation:subject", "included", ["Observation/o1"]),
            ("Patient?_revinclude=Observation:patient&_revinclude=Encounter:subject:Patient", "included",
             ["Encounter/e1", "Encounter/e2", "Encounter/e3", "Encounter/e4", "Encounter/e5", "Encounter/e6",
              "Observation/o1", "Observation/o3"]),
            ("Patient?_id=p1&_revinclude=Encounter:subject:Group", "included", []),
            ("Encounter?_id=e1&_include=Encounter:part-of", "included", ["Encounter/e2"]),
            ("Encounter?_id=e1,e2&_include=Encounter:part-of", "included", ["Encounter/e3"]),
            ("Encounter?_id=e1&_include=Encounter:*", "included", ["Encounter/e2", "Organization/org1", "Patient/p1"]),
            ("Encounter?_id=e2&_include:iterate=Encounter:part-of", "included",
             ["Encounter/e3", "Encounter/e4", "Encounter/e5", "Encounter/e6"]),
            ("Encounter?_id=e1&_include:iterate=Encounter:part-of", "included", None),   # a 5th round
            ("Encounter?_id=e5&_revinclude:iterate=Encounter:part-of", "included",
             ["Encounter/e1", "Encounter/e2", "Encounter/e3", "Encounter/e4"]),
            ("Encounter?_id=e6&_revinclude:iterate=Encounter:part-of", "included", None),
            ("Encounter?_id=e6&_revinclude=Encounter:part-of", "included", ["Encounter/e5"]),
            ("Observation?_id=o1&_include=Observation:encounter&_include:iterate=Encounter:service-provider",
             "included", ["Encounter/e1", "Organization/org1"]),
            ("Observation?_id=o1&_include=Observation:encounter&_include=Encounter:service-provider",
             "included", ["Encounter/e1"]),
            ("Patient?_id=p1&_revinclude=Observation:subject&_include=Observation:encounter", "included",
             ["Observation/o1"]),
            ("Patient?_id=p1&_revinclude=Observation:subject&_include:iterate=Observation:encounter", "included",
             ["Encounter/e1", "Observation/o1"]),
            ("Patient?_id=p1&_revinclude=Observation:subject&_sort=family", "ordered", ["p1"]),
            ("Observation?_include=Observation:code", "included", None),
            ("Observation?_include=Observation:foo", "included", None),
            ("Observation?_include=Observation:subject:Practitioner", "included", None),
            ("Observation?_include=Observation", "included", None),
            ("Observation?_include:recurse=Observation:subject", "included", None),
            ("Observation?_include=Foo:subject", "included", None),
        ]
        for query, field, want in field_cases:
            count[0] += 1
            try:
                got = search(ev, query, now_ns).get(field, "no field %r" % field)
            except Unsupported:
                got = None
            if got != want:
                failures.append("%s [%s]: got %r, want %r" % (query, field, got, want))
        count[0] += 1
        try:
            search(Evaluator(data, ev.registry, last_updated="now"), "Patient?_sort=-_lastUpdated", now_ns)
            failures.append("_sort=-_lastUpdated with --last-updated now: did not refuse")
        except Unsupported:
            pass

    for f in failures:
        print("FAIL " + f)
    print("self-test: %d passed, %d failed" % (count[0] - len(failures), len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
