"""virConf syntax: every grammar rule, every error message, the writer and round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vmconfine.config.conf as conf_module
from vmconfine.config.conf import (
    MAX_CONFIG_FILE_SIZE,
    MAX_LIST_DEPTH,
    ConfComment,
    ConfEntry,
    ConfFile,
    format_value,
    parse_conf,
    read_conf_file,
    string_is_writable,
)
from vmconfine.errors import ConfigError, VmconfineError

DATA = Path(__file__).resolve().parent.parent / "data" / "conf"


def values(text: str) -> dict[str, Any]:
    """Name -> value of the first occurrence of each name."""
    conf = parse_conf(text)
    return {e.name: conf.get(e.name).value for e in conf.entries}  # type: ignore[union-attr]


# -- accepted syntax ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # statements and separators
        ("a = 1", {"a": 1}),
        ("a = 1\nb = 2\n", {"a": 1, "b": 2}),
        ("a = 1; b = 2", {"a": 1, "b": 2}),
        ("a = 1 ;b = 2;", {"a": 1, "b": 2}),
        ("a = 1;\n\n   b = 2", {"a": 1, "b": 2}),
        ("a = 1\r\nb = 2\r\n", {"a": 1, "b": 2}),
        ("a = 1\rb = 2\r", {"a": 1, "b": 2}),
        ("\n\n\ta=1\t\n", {"a": 1}),
        ("a\t=\t1", {"a": 1}),
        # names
        ("A = 1", {"A": 1}),
        ("a_b9_ = 1", {"a_b9_": 1}),
        ("x1=2", {"x1": 2}),
        # comments
        ("# only a comment", {}),
        ("   # indented comment\na = 1", {"a": 1}),
        ("a = 1 # trailing comment", {"a": 1}),
        ("a = 1# no space", {"a": 1}),
        ("a = 1; # after a separator", {"a": 1}),
        ('a = "x # not a comment"', {"a": "x # not a comment"}),
        # strings
        ('a = "double"', {"a": "double"}),
        ("a = 'single'", {"a": "single"}),
        ("a = \"it's\"", {"a": "it's"}),
        ("a = 'say \"hi\"'", {"a": 'say "hi"'}),
        ('a = ""', {"a": ""}),
        ("a = ''", {"a": ""}),
        (r'a = "no\nescapes\"', {"a": "no\\nescapes\\"}),
        ('a = "\tkeeps blanks "', {"a": "\tkeeps blanks "}),
        ('a = """multi\nline"""', {"a": "multi\nline"}),
        ('a = """it\'s "quoted" """', {"a": "it's \"quoted\" "}),
        ('a = """x"""', {"a": "x"}),
        ('a = """"x"""', {"a": '"x'}),
        ('a = """\r\n"""', {"a": "\r\n"}),
        ('a = """"""\n', {"a": ""}),
        ('a = "é ünïcode"', {"a": "é ünïcode"}),
        # integers
        ("a = 0", {"a": 0}),
        ("a = 42", {"a": 42}),
        ("a = +7", {"a": 7}),
        ("a = -7", {"a": -7}),
        ("a = 007", {"a": 7}),
        ("a = 18446744073709551616", {"a": 2**64}),
        # lists
        ("a = []", {"a": []}),
        ("a = [ ]", {"a": []}),
        ("a = [\n]", {"a": []}),
        ('a = [ "x" ]', {"a": ["x"]}),
        ("a = [ 1, 2, [ 3, 4 ], 5 ]", {"a": [1, 2, [3, 4], 5]}),
        ('a = [1,"b",\'c\',-4]', {"a": [1, "b", "c", -4]}),
        ("a = [ 1, 2, ]", {"a": [1, 2]}),
        ("a = [\n  1,\n  2,\n]", {"a": [1, 2]}),
        ("a = [\r\n 1\r\n ,\r\n 2 ]", {"a": [1, 2]}),
        ("a = [ [ [ ] ] ]", {"a": [[[]]]}),
        ('a = [ """x\ny""", 1 ]', {"a": ["x\ny", 1]}),
        # whole files
        ("", {}),
        ("   \n\t\n", {}),
        ("a = 1\na = 2", {"a": 1}),
    ],
)
def test_accepted_syntax(text: str, expected: dict[str, Any]) -> None:
    assert values(text) == expected


def test_first_occurrence_wins_but_duplicates_are_kept() -> None:
    conf = parse_conf("user = 'a'\ngroup = 'g'\nuser = 'b'\n")
    assert conf.get("user") == ConfEntry("user", "a", 1)
    assert [(e.name, e.value) for e in conf.entries] == [
        ("user", "a"), ("group", "g"), ("user", "b"),
    ]
    assert conf.get("missing") is None


def test_comments_are_kept_in_order_with_their_lines() -> None:
    conf = parse_conf("# head\na = 1 # tail\n\n  #indented\nb = 2\n")
    assert conf.items == [
        ConfComment(" head", 1),
        ConfEntry("a", 1, 2, " tail"),
        ConfComment("indented", 4),
        ConfEntry("b", 2, 5),
    ]


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("a = 1\nb = 2\n\nc = 3", [1, 2, 4]),
        ("a = 1\r\nb = 2\r\n\r\nc = 3", [1, 2, 4]),
        ("a = 1\rb = 2\r\rc = 3", [1, 2, 4]),
        ('a = """x\ny\nz"""\nb = 1', [1, 4]),
        ("a = [\n1,\n2]\nb = 1", [1, 4]),
        ("a = 1; b = 2\nc = 3", [1, 1, 2]),
    ],
)
def test_entry_lines(text: str, lines: list[int]) -> None:
    assert [e.line for e in parse_conf(text).entries] == lines


# -- every error message --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a = 1 b = 2", 1, "expecting a separator"),
        ("a = 1.5", 1, "expecting a separator"),
        ("a = 0x10", 1, "expecting a separator"),
        ("a = 12abc", 1, "expecting a separator"),
        ('a = "x" "y"', 1, "expecting a separator"),
        ("a = 1\nb = [ 1 ] ]", 2, "expecting a separator"),
        ('a = """"""', 1, "expecting a separator"),  # libvirt needs 7 chars left for """
        ("1a = 2", 1, "expecting a name"),
        ("_a = 1", 1, "expecting a name"),
        ("= 1", 1, "expecting a name"),
        ("a = 1;;", 1, "expecting a name"),
        ("é = 1", 1, "expecting a name"),
        ("a = 1\n\n  -b = 2", 3, "expecting a name"),
        ("a", 1, "expecting an assignment"),
        ("a 1", 1, "expecting an assignment"),
        ("a: 1", 1, "expecting an assignment"),
        ("a-b = 1", 1, "expecting an assignment"),
        ("a.b = 1", 1, "expecting an assignment"),
        ("a\n= 1", 1, "expecting an assignment"),
        ("a =", 1, "expecting a value"),
        ("a = \n1", 1, "expecting a value"),
        ("a = true", 1, "expecting a value"),
        ("a = yes", 1, "expecting a value"),
        ("a = none", 1, "expecting a value"),
        ("a = .5", 1, "expecting a value"),
        ("a = # comment", 1, "expecting a value"),
        ("a = [ 1, , 2 ]", 1, "expecting a value"),
        ("a = [ 1,", 1, "expecting a value"),
        ("a = [\n # comment\n 1 ]", 2, "expecting a value"),
        ("a = [ bare ]", 1, "expecting a value"),
        ('a = "abc', 1, "unterminated string"),
        ("a = 'abc", 1, "unterminated string"),
        ("a = 'x\"", 1, "unterminated string"),
        ('a = "abc\n"', 1, "unterminated string"),
        ('b = 1\na = "abc\r\n"', 2, "unterminated string"),
        ('a = """abcdef', 1, "unterminated string"),
        ('a = """abc\ndef\n', 3, "unterminated string"),
        ("a = -", 1, "unterminated number"),
        ("a = +", 1, "unterminated number"),
        ("a = -x", 1, "unterminated number"),
        ("a = [ - ]", 1, "unterminated number"),
        ("a = [ 1 2 ]", 1, "expecting a separator in list"),
        ("a = [ 1 ; 2 ]", 1, "expecting a separator in list"),
        ('a = [ "x" # comment\n ]', 1, "expecting a separator in list"),
        ("a = [\n 1\n 2 ]", 3, "expecting a separator in list"),
        ("a = [", 1, "list is not closed with ]"),
        ("a = [ 1", 1, "list is not closed with ]"),
        ("a = [ 1, 2\n\n", 3, "list is not closed with ]"),
        ("a = [ [ 1 ]", 1, "list is not closed with ]"),
        ("a = " + "[" * (MAX_LIST_DEPTH + 1), 1, "lists are nested too deeply"),
    ],
)
def test_error_messages(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_conf(text, "test.conf")
    text_of_error = str(info.value)
    assert text_of_error.startswith(f"test.conf:{line}: {message}")
    assert text_of_error == f"test.conf:{line}: {message}" or text_of_error.startswith(
        f"test.conf:{line}: {message} ("
    )
    assert "\n" not in text_of_error
    assert isinstance(info.value, VmconfineError)


def test_errors_name_memory_conf_by_default() -> None:
    with pytest.raises(ConfigError, match=r"^memory conf:2: expecting a value"):
        parse_conf("ok = 1\nbad = true\n")


def test_error_hints_point_at_the_opening_line() -> None:
    with pytest.raises(ConfigError, match=r"list opened on line 2"):
        parse_conf("a = 1\nb = [ 1,\n 2,\n 3\n")
    with pytest.raises(ConfigError, match=r'""" string opened on line 2'):
        parse_conf('a = 1\nb = """never closed\nat all\n')


def test_nesting_up_to_the_limit_is_accepted() -> None:
    text = "a = " + "[" * MAX_LIST_DEPTH + "]" * MAX_LIST_DEPTH
    value: Any = parse_conf(text).get("a").value  # type: ignore[union-attr]
    for _ in range(MAX_LIST_DEPTH - 1):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == []


# -- writer ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("abc", '"abc"'),
        ("", '""'),
        ("it's", "\"it's\""),
        ('say "hi"', "'say \"hi\"'"),
        ('has """ inside', "'has \"\"\" inside'"),
        ("it's \"both\" ", '"""it\'s "both" """'),
        ("two\nlines", '"""two\nlines"""'),
        ("carriage\rreturn", '"""carriage\rreturn"""'),
        (0, "0"),
        (128, "128"),
        (-5, "-5"),
        (True, "1"),
        (False, "0"),
        ([], "[  ]"),
        (["a"], '[ "a" ]'),
        ([1, 2, [3, 4], 5], "[ 1, 2, [ 3, 4 ], 5 ]"),
    ],
)
def test_format_value(value: Any, written: str) -> None:
    assert format_value(value) == written


@pytest.mark.parametrize(
    "value",
    ["it's \"\"\" here", 'ends with quote\n"', "both ' and \"", 1.5, None, {"a": 1}, ["ok", 2.0]],
)
def test_format_value_refuses_what_cannot_be_read_back(value: Any) -> None:
    with pytest.raises(ValueError, match="cannot write"):
        format_value(value)


@pytest.mark.parametrize("name", ["fc4", "no-newline", "quoting"])
def test_round_trip_fixtures(name: str) -> None:
    conf = read_conf_file(DATA / f"{name}.conf")
    expected = (DATA / f"{name}.out").read_bytes().decode()
    written = conf.write()
    assert written == expected
    again = parse_conf(written)
    assert again.write() == written
    assert [(e.name, e.value, e.comment) for e in again.entries] == [
        (e.name, e.value, e.comment) for e in conf.entries
    ]


def test_fc4_values() -> None:
    conf = read_conf_file(DATA / "fc4.conf")
    assert conf.filename == str(DATA / "fc4.conf")
    assert conf.get("memory") == ConfEntry("memory", 128, 4, " should be enough")
    assert conf.get("tst").value == [1, 2, [3, 4], 5]  # type: ignore[union-attr]
    assert conf.get("on_reboot").line == 9  # type: ignore[union-attr]
    assert conf.where(conf.get("tst")) == f"{DATA / 'fc4.conf'}:12"  # type: ignore[arg-type]


def test_write_of_a_built_conf_file() -> None:
    conf = ConfFile("built", [ConfComment(" made by hand", 1), ConfEntry("a", ["x"], 2, "c")])
    assert conf.write() == '# made by hand\na = [ "x" ] #c\n'


# -- files ----------------------------------------------------------------------------------

def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.conf: cannot read .* does not exist"):
        read_conf_file(tmp_path / "nope.conf")


def test_read_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .* is a directory"):
        read_conf_file(tmp_path)


def test_read_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "qemu.conf"
    path.write_text("a = 1\n")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(conf_module, "open", denied, raising=False)
    with pytest.raises(ConfigError, match=r"qemu\.conf: cannot read .*Permission denied"):
        read_conf_file(path)


def test_size_cap(tmp_path: Path) -> None:
    at_limit = tmp_path / "limit.conf"
    at_limit.write_bytes(b"#" + b"x" * (MAX_CONFIG_FILE_SIZE - 3) + b"\na")
    with pytest.raises(ConfigError, match=r"limit\.conf:2: expecting an assignment"):
        read_conf_file(at_limit)  # read and parsed in full: the error is on its last byte
    too_big = tmp_path / "big.conf"
    with open(too_big, "wb") as handle:
        handle.truncate(MAX_CONFIG_FILE_SIZE + 1)
    with pytest.raises(ConfigError, match=r"big\.conf: .*larger than the 10 MiB limit"):
        read_conf_file(too_big)
    with pytest.raises(ConfigError, match=r"larger than the 10 MiB limit"):
        parse_conf(" " * (MAX_CONFIG_FILE_SIZE + 1))


def test_bytes_that_are_not_utf8_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"# caf\xe9\nname = \"\xff\xfe\"\n")
    conf = read_conf_file(path)
    assert conf.write().encode("utf-8", "surrogateescape") == path.read_bytes()


# -- properties -----------------------------------------------------------------------------

NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,12}", fullmatch=True)
STRINGS = st.text(max_size=20).filter(string_is_writable)
VALUES = st.recursive(
    st.integers() | STRINGS,
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)
COMMENTS = st.none() | st.text(max_size=15).filter(lambda s: "\n" not in s and "\r" not in s)


@given(VALUES)
def test_value_round_trip(value: Any) -> None:
    entry = parse_conf(f"x = {format_value(value)}").get("x")
    assert entry is not None and entry.value == value


@given(st.lists(st.tuples(NAMES, VALUES, COMMENTS), max_size=8))
def test_file_round_trip(statements: list[tuple[str, Any, str | None]]) -> None:
    built = ConfFile("gen", [ConfEntry(n, v, i + 1, c) for i, (n, v, c) in enumerate(statements)])
    written = built.write()
    parsed = parse_conf(written)
    assert [(e.name, e.value, e.comment) for e in parsed.entries] == [
        (n, v, c) for n, v, c in statements
    ]
    assert parsed.write() == written


@settings(max_examples=300)
@given(st.text(alphabet=' \t\r\n#=;,[]"\'+-019azAZ_é', max_size=40))
def test_parser_fails_only_with_config_error(text: str) -> None:
    try:
        conf = parse_conf(text)
    except ConfigError as err:
        assert str(err).startswith("memory conf:")
        assert "\n" not in str(err)
    else:
        assert parse_conf(conf.write()).write() == conf.write()
