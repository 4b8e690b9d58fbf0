//! Rendering a checkpoint's Jinja chat template with minijinja, the way transformers does.
//!
//! transformers renders `chat_template` in a sandboxed Jinja2 environment with
//! `trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, a `tojson` filter that
//! neither escapes HTML nor non-ASCII, and the globals `raise_exception` and `strftime_now`; the
//! template sees `messages`, `add_generation_prompt` and the special tokens (`bos_token`,
//! `eos_token`, ...). We set up the same here; Python string methods (`.strip()`,
//! `.startswith()`, ...) that templates use come from minijinja-contrib's pycompat layer, with
//! Python's whitespace and the padding methods it lacks added here ([`py_methods`]), and
//! `'literal' % operand` becomes the `format` filter ([`percent_formats`]).
//! This module must not know about token ids or the model.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{Environment, Error, ErrorKind, State};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

const NAME: &str = "chat_template";

/// Work budget of one render (minijinja fuel: one unit per instruction, and one per 64 bytes of
/// data a template creates). A chat template comes from the model files, so it is untrusted:
/// without a budget, nested loops run for hours and a string doubled in a loop
/// (`{% set ns.s = ns.s ~ ns.s %}`) grows until the allocator aborts the process. 2^22 bounds
/// a render to about 256 MiB and, in release builds, well under a second (a few seconds when
/// iterating deeply nested lazy `list + list` chains); a ChatML conversation of 2,000
/// messages renders within it (tested), far more than fits any supported context.
const FUEL: u64 = 1 << 22;

impl ChatTemplate {
    /// Compile `source`; the error text explains a syntax error.
    pub fn new(source: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| format!("cannot set up the template engine: {e}"))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(py_methods);
        env.add_filter("tojson", tojson);
        env.add_filter("format", format_filter);
        env.add_filter("indent", indent_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, normalized(source))
            .map_err(|e| format!("the chat template is not valid Jinja: {}", describe(&e)))?;
        Ok(ChatTemplate { env })
    }

    /// Render `messages`; `special` are extra variables such as `("eos_token", "<|im_end|>")`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special: &[(&str, &str)],
    ) -> Result<String, String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut vars: Vec<(&str, Value)> =
            special.iter().map(|&(k, v)| (k, Value::from(v))).collect();
        // transformers always defines these (None unless given)
        vars.push(("tools", Value::from(())));
        vars.push(("documents", Value::from(())));
        vars.push(("messages", Value::from(msgs)));
        vars.push(("add_generation_prompt", Value::from(add_generation_prompt)));
        let ctx = Value::from_pairs(vars);
        let tmpl = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        tmpl.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation
                && e.detail().is_some_and(|d| d.starts_with(RAISED))
            {
                let msg = e.detail().unwrap_or_default().trim_start_matches(RAISED);
                format!("the chat template rejected the messages: {msg}")
            } else if e.kind() == ErrorKind::OutOfFuel {
                format!(
                    "rendering the chat template failed: it needs more work or memory than the \
                     limit of {FUEL} steps allows (a loop that never ends or grows a value without bound?)"
                )
            } else {
                format!("rendering the chat template failed: {}", describe(&e))
            }
        })
    }
}

/// The source as Jinja2 (and so transformers) reads it: line ends `\r\n` and `\r` become `\n`;
/// transformers' `{% generation %}` … `{% endgeneration %}` (which marks the assistant's
/// text for token masks and renders its body unchanged) an always-true `if` block with the same
/// whitespace control; and Python's `'literal' % operand` in expressions and tags the `format`
/// filter (see [`percent_formats`]). Everything else, and all of comments and `{% raw %}`
/// blocks, is copied as it is.
fn normalized(source: &str) -> String {
    let text = source.replace("\r\n", "\n").replace('\r', "\n");
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut i, mut copied) = (0, 0);
    while i + 1 < b.len() {
        if b[i] != b'{' || !matches!(b[i + 1], b'{' | b'%' | b'#') {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        if let Some((len, lead, word, trail)) = block_tag(rest) {
            match word {
                "generation" | "endgeneration" => {
                    out.push_str(&text[copied..i]);
                    let word = if word == "generation" {
                        "if true"
                    } else {
                        "endif"
                    };
                    out.push_str(&format!("{{%{lead} {word} {trail}%}}"));
                    i += len;
                    copied = i;
                    continue;
                }
                "raw" => {
                    // to the end of the matching endraw tag (or of the source)
                    let mut k = i + len;
                    i = loop {
                        match text[k..].find("{%") {
                            Some(at) => match block_tag(&text[k + at..]) {
                                Some((l, _, "endraw", _)) => break k + at + l,
                                _ => k += at + 2,
                            },
                            None => break b.len(),
                        }
                    };
                    continue;
                }
                _ => {}
            }
        }
        let close = match b[i + 1] {
            b'{' => "}}",
            b'%' => "%}",
            _ => "#}",
        };
        i = match closing(&rest[2..], close, b[i + 1] != b'#') {
            Some(at) => {
                let body = &rest[2..2 + at];
                if b[i + 1] != b'#' {
                    if let Some(body) = percent_formats(body) {
                        out.push_str(&text[copied..i + 2]);
                        out.push_str(&body);
                        copied = i + 2 + at;
                    }
                }
                i + 2 + at + 2
            }
            None => b.len(),
        };
    }
    out.push_str(&text[copied..]);
    out
}

/// `body` (of a `{{ }}` or `{% %}`) with each `'literal' % operand` written as
/// `'literal'|format(operand)`, or `None` if there is none. Jinja2 evaluates `%` on a string
/// with Python's printf-style formatting; minijinja's `%` is only the numeric remainder and has
/// no hook for it, but its `format` filter is that same formatting (with its own guards against
/// huge widths). Only a string literal on the left is rewritten, and only when the rewrite
/// keeps Jinja2's grouping: the literal must not follow `*`, `/`, `%` (which would take it
/// first, left to right) or another literal, and the operand must be one unary expression as
/// Jinja2's parser reads the right side of `%` (a name, number, string or bracket with
/// attributes, subscripts, calls and filters) without an `is` test or a `**` after it. A
/// parenthesized tuple gives its items as the format arguments, as Python unpacks a tuple;
/// anything else is one argument. When unsure we leave the text alone (and minijinja reports
/// the error it reported before).
fn percent_formats(body: &str) -> Option<String> {
    // Bounded: a rejected operand is scanned again from the next literal inside it, which is
    // quadratic in the worst case; no real template has an expression of this size, and one
    // that does keeps its `%` as written (minijinja's error, as before).
    const MAX_BODY: usize = 8192;
    if body.len() > MAX_BODY {
        return None;
    }
    percent_formats_nested(body, 0)
}

/// [`percent_formats`] inside an operand `depth` levels down (bounded: a deeply nested
/// template keeps its inner `%` as written rather than recursing without limit).
fn percent_formats_nested(body: &str, depth: usize) -> Option<String> {
    const MAX_DEPTH: usize = 8;
    if depth > MAX_DEPTH {
        return None;
    }
    let b = body.as_bytes();
    let mut out = String::new();
    let (mut k, mut copied) = (0, 0);
    // whether a string literal at this point would be the left operand of `%` as a whole
    let mut may_start = true;
    // after `is` or `is not` comes a test's name (`x is in 'abc' % 2` is `(x is in 'abc') % 2`,
    // with `in` the test: not a keyword there)
    let mut test_name = false;
    while k < b.len() {
        let c = b[k];
        if c.is_ascii_whitespace() {
            k += 1;
        } else if c == b'\'' || c == b'"' {
            let end = string_end(b, k)?;
            if may_start {
                let mut p = skip_ws(b, end);
                if b.get(p) == Some(&b'%') {
                    p += 1;
                    if let Some(op_end) = unary_end(b, p) {
                        let operand = body[p..op_end].trim();
                        let args = match tuple_items(operand) {
                            Some(items) => items.to_string(),
                            None => format!("({operand})"),
                        };
                        let args = percent_formats_nested(&args, depth + 1).unwrap_or(args);
                        // the line ends between the literal and the operand stay (inside the
                        // call's brackets), so later errors name the right line
                        let lost =
                            body[end..op_end].matches('\n').count() - operand.matches('\n').count();
                        out.push_str(&body[copied..end]);
                        let _ = write!(out, "|format({args}{})", "\n".repeat(lost));
                        copied = op_end;
                        k = op_end;
                        may_start = false;
                        continue;
                    }
                }
            }
            k = end;
            may_start = false;
            test_name = false;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = k;
            while k < b.len() && (b[k].is_ascii_alphanumeric() || b[k] == b'_') {
                k += 1;
            }
            let word = &body[start..k];
            if test_name || word == "is" {
                // `is`, `not` after it, or the test's name: a literal after the name is the
                // test's argument, which binds before `%`
                test_name = word == "is" || (test_name && word == "not");
                may_start = false;
                continue;
            }
            // after a keyword an expression starts; after a name or number it continues
            may_start = matches!(
                word,
                "if" | "elif"
                    | "else"
                    | "and"
                    | "or"
                    | "not"
                    | "in"
                    | "set"
                    | "for"
                    | "print"
                    | "do"
                    | "return"
            );
        } else {
            k += 1;
            may_start =
                !matches!(c, b'*' | b'/' | b'%' | b')' | b']' | b'}' | b'.' | b'|') && c.is_ascii();
            test_name = false;
        }
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&body[copied..]);
    Some(out)
}

fn skip_ws(b: &[u8], mut k: usize) -> usize {
    while k < b.len() && b[k].is_ascii_whitespace() {
        k += 1;
    }
    k
}

/// The end of the string literal opening at `b[k]` (a quote), `None` if it does not close.
fn string_end(b: &[u8], k: usize) -> Option<usize> {
    let q = b[k];
    let mut j = k + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            x if x == q => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The end of the bracket opening at `b[k]`, `None` if it does not close.
fn group_end(b: &[u8], k: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = k;
    while j < b.len() {
        match b[j] {
            b'\'' | b'"' => {
                j = string_end(b, j)?;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    None
}

fn name_end(b: &[u8], k: usize) -> Option<usize> {
    let mut j = k;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    (j > k).then_some(j)
}

/// The end of the unary expression starting at `b[k]` (after `%`) as Jinja2's `parse_unary`
/// reads it, `None` where we do not follow it (see [`percent_formats`]).
fn unary_end(b: &[u8], k: usize) -> Option<usize> {
    let mut p = skip_ws(b, k);
    while matches!(b.get(p), Some(b'-' | b'+')) {
        p = skip_ws(b, p + 1);
    }
    // primary: a name, number, string literal(s) or bracket
    p = match *b.get(p)? {
        b'\'' | b'"' => {
            let mut e = string_end(b, p)?;
            while matches!(b.get(skip_ws(b, e)), Some(b'\'' | b'"')) {
                e = string_end(b, skip_ws(b, e))?;
            }
            e
        }
        b'(' | b'[' | b'{' => group_end(b, p)?,
        c if c.is_ascii_digit() => {
            let mut e = p;
            while e < b.len()
                && (b[e].is_ascii_alphanumeric()
                    || b[e] == b'_'
                    || b[e] == b'.'
                    || (matches!(b[e], b'+' | b'-') && matches!(b[e - 1], b'e' | b'E')))
            {
                e += 1;
            }
            e
        }
        c if c.is_ascii_alphabetic() || c == b'_' => {
            let e = name_end(b, p)?;
            if matches!(
                std::str::from_utf8(&b[p..e]).ok()?,
                "not" | "and" | "or" | "if" | "else" | "in" | "is"
            ) {
                return None;
            }
            e
        }
        _ => return None,
    };
    // postfix: `.name`, `.0`, `[...]`, `(...)`; then filters `|name(.name)*` and calls
    loop {
        let q = skip_ws(b, p);
        p = match b.get(q) {
            Some(b'.') => name_end(b, skip_ws(b, q + 1))?,
            Some(b'[' | b'(') => group_end(b, q)?,
            Some(b'|') => {
                let mut e = name_end(b, skip_ws(b, q + 1))?;
                while b.get(skip_ws(b, e)) == Some(&b'.') {
                    e = name_end(b, skip_ws(b, skip_ws(b, e) + 1))?;
                }
                e
            }
            Some(b'i') if b[q..].starts_with(b"is") && name_end(b, q) == Some(q + 2) => {
                return None
            }
            Some(b'*') if b.get(q + 1) == Some(&b'*') => return None,
            _ => return Some(p),
        };
    }
}

/// The items of a parenthesized tuple `(a, b,)` as call arguments (`a, b`), or `None` if
/// `operand` is not one (a bracket around one expression is that expression).
fn tuple_items(operand: &str) -> Option<&str> {
    let b = operand.as_bytes();
    if b.first() != Some(&b'(') || group_end(b, 0) != Some(b.len()) {
        return None;
    }
    let inner = operand[1..operand.len() - 1].trim();
    if inner.is_empty() {
        return Some(inner);
    }
    // a comma at the top level of the bracket
    let ib = inner.as_bytes();
    let mut j = 0;
    let mut comma = false;
    while j < ib.len() {
        match ib[j] {
            b'\'' | b'"' => {
                j = string_end(ib, j)?;
                continue;
            }
            b'(' | b'[' | b'{' => {
                j = group_end(ib, j)?;
                continue;
            }
            b',' => comma = true,
            _ => {}
        }
        j += 1;
    }
    comma.then(|| inner.strip_suffix(',').unwrap_or(inner).trim_end())
}

/// `{%[-+]? name [-+]?%}` (a tag of one word and nothing else) at the start of `s`: its length,
/// whitespace-control marks and name.
fn block_tag(s: &str) -> Option<(usize, &str, &str, &str)> {
    fn mark(t: &str) -> &str {
        if t.starts_with(['-', '+']) {
            &t[..1]
        } else {
            ""
        }
    }
    let body = s.strip_prefix("{%")?;
    let lead = mark(body);
    let t = body[lead.len()..].trim_start();
    let n = t
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(t.len());
    let (word, t) = t.split_at(n);
    let t = t.trim_start();
    let trail = mark(t);
    let t = t[trail.len()..].strip_prefix("%}")?;
    Some((s.len() - t.len(), lead, word, trail))
}

/// Where `close` ends an expression, tag or comment body `s`: outside string literals and
/// brackets (`strings`; a comment has neither).
fn closing(s: &str, close: &str, strings: bool) -> Option<usize> {
    let b = s.as_bytes();
    let (mut quote, mut depth, mut k) = (None, 0usize, 0);
    while k < b.len() {
        match quote {
            Some(_) if b[k] == b'\\' => k += 1,
            Some(q) if b[k] == q => quote = None,
            Some(_) => {}
            None if depth == 0 && b[k..].starts_with(close.as_bytes()) => return Some(k),
            None if strings && matches!(b[k], b'\'' | b'"') => quote = Some(b[k]),
            None if strings && matches!(b[k], b'(' | b'[' | b'{') => depth += 1,
            None if strings && matches!(b[k], b')' | b']' | b'}') => {
                depth = depth.saturating_sub(1)
            }
            None => {}
        }
        k += 1;
    }
    None
}

/// The error text with the line it points at (minijinja keeps the cause chain separate).
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let _ = write!(s, ": {inner}");
        src = inner.source();
    }
    s
}

/// Python methods on values: minijinja-contrib's pycompat callback, with the `str` methods it
/// lacks (`center`, `ljust`, `rjust`, `zfill`) added and those whose whitespace differs from
/// Python's (`strip`, `lstrip`, `rstrip`, `split` without a separator, `isspace`) replaced.
/// Anything else (and these with arguments we do not handle, e.g. keyword arguments) goes to
/// pycompat unchanged.
fn py_methods(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        if method == "format" {
            check_format_specs(s, b'{', b'}')?;
        }
        if let Some(out) = py_str_method(s, method, args)? {
            return Ok(out);
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// The `format` filter (printf-style, also what `'literal' % operand` becomes): minijinja's,
/// after refusing widths and precisions above [`MAX_PAD_WIDTH`], which it would otherwise
/// allocate whatever their size (`'%999999999999s'` aborted the process), and more arguments
/// than the format converts, which Python refuses ("not all arguments converted") and
/// minijinja would drop. (Widths pad by UTF-8 bytes in minijinja, by characters in Python:
/// `'%5s' % 'é'` differs by one space.)
fn format_filter(
    state: &mut State,
    fmt: &Value,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, Error> {
    if let Some(s) = fmt.as_str() {
        check_format_specs(s, b'%', 0)?;
        let positional = args.iter().filter(|a| !a.is_kwargs()).count();
        // one mapping may go unused (`'a' % {'k': 1}` is 'a' in Python); keyword arguments
        // are a mapping too
        let mapping =
            positional < args.len() || matches!(&args[..], [v] if v.kind() == ValueKind::Map);
        if let Some(takes) = printf_arguments(s).filter(|_| !mapping) {
            if positional > takes {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "not all arguments converted during string formatting",
                ));
            }
        }
    }
    minijinja::filters::format(state, fmt, args)
}

/// jinja2's `indent(width=4, first=False, blank=False)`: every line after the first (and the
/// first with `first`) prefixed by `width` spaces, or by `width` itself if it is a string;
/// empty lines only with `blank`. Lines are Python's `str.splitlines()` of the text plus a
/// newline, so a trailing newline is dropped and `\r`, `\x0b`, `\x1c`, `\u2028`, ... also end
/// lines (and become `\n`). Ours, not minijinja's: that one neither takes a string width nor
/// bounds a numeric one (`indent(99999999999)` aborted the process).
fn indent_filter(
    value: &Value,
    width: Option<Value>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let width = match width {
        Some(w) => Some(w),
        None => kwargs.get::<Option<Value>>("width")?,
    };
    let first = first
        .or(kwargs.get::<Option<bool>>("first")?)
        .unwrap_or(false);
    let blank = blank
        .or(kwargs.get::<Option<bool>>("blank")?)
        .unwrap_or(false);
    kwargs.assert_all_used()?;
    let prefix = match width {
        None => "    ".to_string(),
        Some(w) if w.kind() == ValueKind::String => w.as_str().unwrap_or_default().to_string(),
        Some(w) => {
            let n = i64::try_from(w)?;
            within_pad_limit(n, format_args!("indent: width {n}"))?;
            " ".repeat(usize::try_from(n).unwrap_or(0))
        }
    };
    let text = format!("{value}\n");
    let lines = py_splitlines(&text);
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if (i > 0 || first) && (blank || !line.is_empty() || (i == 0 && first)) {
            out.push_str(&prefix);
        }
        out.push_str(line);
    }
    Ok(Value::from(out))
}

/// Python's `str.splitlines()` (no line ends kept): `\n`, `\r`, `\r\n`, `\x0b`, `\x0c`,
/// `\x1c`-`\x1e`, `\x85`, `\u2028` and `\u2029` end a line; no empty last line for a text
/// that ends with one of them.
fn py_splitlines(s: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let (mut start, mut it) = (0, s.char_indices().peekable());
    while let Some((i, c)) = it.next() {
        if matches!(
            c,
            '\n' | '\r'
                | '\u{b}'
                | '\u{c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        ) {
            lines.push(&s[start..i]);
            let mut next = i + c.len_utf8();
            if c == '\r' && it.peek().map(|p| p.1) == Some('\n') {
                it.next();
                next += 1;
            }
            start = next;
        }
    }
    if start < s.len() {
        lines.push(&s[start..]);
    }
    lines
}

/// The positional arguments the printf-style format `fmt` converts (each conversion one, and
/// one more for each `*` width or precision; `%%` none), or `None` if it names mapping keys
/// (`%(key)s`), where the argument is one mapping.
fn printf_arguments(fmt: &str) -> Option<usize> {
    let b = fmt.as_bytes();
    let (mut k, mut n) = (0, 0);
    while k < b.len() {
        if b[k] != b'%' {
            k += 1;
            continue;
        }
        k += 1;
        match b.get(k) {
            Some(b'%') => {
                k += 1;
                continue;
            }
            Some(b'(') => return None,
            _ => {}
        }
        // flags, width, precision and length modifiers, up to the conversion letter
        while let Some(&c) = b.get(k) {
            k += 1;
            if c == b'*' {
                n += 1;
            } else if !(c.is_ascii_digit()
                || matches!(
                    c,
                    b'#' | b'0' | b'-' | b' ' | b'+' | b'.' | b'h' | b'l' | b'L'
                ))
            {
                break;
            }
        }
        n += 1;
    }
    Some(n)
}

/// An error if a number in a format spec of `fmt` (after `open` up to a conversion letter, or
/// inside `open` … `close` when `close` is not 0) is above [`MAX_PAD_WIDTH`], or if a spec
/// holds a non-ASCII character (minijinja's parser would panic). Conservative: every digit run
/// in a spec counts, field indices too (which are small in any real template).
fn check_format_specs(fmt: &str, open: u8, close: u8) -> Result<(), Error> {
    let b = fmt.as_bytes();
    let mut k = 0;
    while k < b.len() {
        if b[k] != open {
            k += 1;
            continue;
        }
        k += 1;
        if b.get(k) == Some(&open) {
            k += 1; // `%%`, `{{`
            continue;
        }
        // minijinja's format parser steps through a spec byte by byte and panics on a
        // character of several bytes in a key (`'%(é)s'`, `'{0[é]}'`): refused here instead,
        // with every other non-ASCII character in a spec
        let non_ascii = || {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("the format string {fmt:?} has a non-ASCII character in a format spec"),
            )
        };
        if close == 0 && b.get(k) == Some(&b'(') {
            // printf's `%(key)`
            let len = b[k..]
                .iter()
                .position(|&c| c == b')')
                .unwrap_or(b.len() - k);
            if !b[k..k + len].is_ascii() {
                return Err(non_ascii());
            }
            k += len;
        }
        let mut value: u64 = 0;
        while k < b.len() {
            let c = b[k];
            if !c.is_ascii() {
                return Err(non_ascii());
            }
            if c.is_ascii_digit() {
                value = value.saturating_mul(10).saturating_add(u64::from(c - b'0'));
                within_pad_limit(
                    i64::try_from(value).unwrap_or(i64::MAX),
                    format_args!("a width or precision in the format string {fmt:?}"),
                )?;
            } else {
                value = 0;
                let end = if close == 0 {
                    // printf: the spec ends at its conversion letter
                    c.is_ascii_alphabetic() && !matches!(c, b'h' | b'l' | b'L')
                } else {
                    c == close
                };
                if end {
                    break;
                }
            }
            k += 1;
        }
    }
    Ok(())
}

/// Python's `str.isspace()` for one character: Unicode White_Space (what Rust's
/// `char::is_whitespace` tests) plus the separators U+001C..U+001F, which Python also counts
/// (their bidirectional class is B or S).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The most characters `center`, `ljust`, `rjust` and `zfill` may pad to: a template asking
/// for more is an error, not an unbounded allocation.
const MAX_PAD_WIDTH: i64 = 1 << 20;

/// An error saying that `what` (e.g. "padding to width 9999999") is above the limit if `n` is
/// above [`MAX_PAD_WIDTH`]: every width, indent or precision a template can ask for goes
/// through here before it allocates.
fn within_pad_limit(n: i64, what: std::fmt::Arguments<'_>) -> Result<(), Error> {
    if n > MAX_PAD_WIDTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("{what} is above the limit of {MAX_PAD_WIDTH} characters"),
        ));
    }
    Ok(())
}

/// `s.method(*args)` for the `str` methods we implement ourselves; `None` hands the call on to
/// pycompat.
fn py_str_method(s: &str, method: &str, args: &[Value]) -> Result<Option<Value>, Error> {
    // a missing argument or an explicit none: Python's "whitespace" default
    let no_chars = |args: &[Value]| match args {
        [] => true,
        [v] => v.is_none(),
        _ => false,
    };
    Ok(Some(match method {
        "strip" if no_chars(args) => Value::from(s.trim_matches(py_space)),
        "lstrip" if no_chars(args) => Value::from(s.trim_start_matches(py_space)),
        "rstrip" if no_chars(args) => Value::from(s.trim_end_matches(py_space)),
        "isspace" if args.is_empty() => Value::from(!s.is_empty() && s.chars().all(py_space)),
        "split" => {
            let (maxsplit, sep_is_none) = match args {
                [] => (None, true),
                [sep] => (None, sep.is_none()),
                [sep, n] if n.kind() == ValueKind::Number => {
                    (Some(i64::try_from(n.clone())?), sep.is_none())
                }
                _ => (None, false),
            };
            if !sep_is_none {
                return Ok(None);
            }
            Value::from(split_whitespace(s, maxsplit))
        }
        "center" | "ljust" | "rjust" => {
            let (width, fill): (i64, Option<&str>) = from_args(args)?;
            let fill = match fill {
                None => ' ',
                Some(f) => {
                    let mut chars = f.chars();
                    match (chars.next(), chars.next()) {
                        (Some(c), None) => c,
                        _ => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                "the fill character must be exactly one character long",
                            ))
                        }
                    }
                }
            };
            let Some(margin) = pad_margin(s, width)? else {
                return Ok(Some(Value::from(s)));
            };
            // CPython's split of an odd margin for center (unicodeobject.c, pad)
            let left = match method {
                "center" => margin / 2 + (margin & width as usize & 1),
                "ljust" => 0,
                _ => margin,
            };
            let mut out = String::with_capacity(s.len() + margin * fill.len_utf8());
            out.extend(std::iter::repeat_n(fill, left));
            out.push_str(s);
            out.extend(std::iter::repeat_n(fill, margin - left));
            Value::from(out)
        }
        "zfill" => {
            let (width,): (i64,) = from_args(args)?;
            let Some(margin) = pad_margin(s, width)? else {
                return Ok(Some(Value::from(s)));
            };
            // a leading sign stays in front of the zeros
            let (sign, digits) = match s.as_bytes().first() {
                Some(b'+' | b'-') => s.split_at(1),
                _ => ("", s),
            };
            Value::from(format!("{sign}{}{digits}", "0".repeat(margin)))
        }
        _ => return Ok(None),
    }))
}

/// How many characters padding `s` to `width` adds (`None` if none), or an error for a width
/// above [`MAX_PAD_WIDTH`].
fn pad_margin(s: &str, width: i64) -> Result<Option<usize>, Error> {
    within_pad_limit(width, format_args!("padding to width {width}"))?;
    let len = s.chars().count();
    Ok(usize::try_from(width)
        .ok()
        .filter(|&w| w > len)
        .map(|w| w - len))
}

/// Python's `s.split()` / `s.split(None, maxsplit)`: runs of `str.isspace()` characters
/// separate words, none at either end; after `maxsplit` splits (if >= 0) the rest is one word
/// with its leading whitespace removed and its trailing whitespace kept.
fn split_whitespace(s: &str, maxsplit: Option<i64>) -> Vec<Value> {
    let mut left = maxsplit.filter(|&n| n >= 0);
    let mut words = Vec::new();
    let mut rest = s.trim_start_matches(py_space);
    while !rest.is_empty() {
        if left == Some(0) {
            words.push(Value::from(rest));
            break;
        }
        let end = rest.find(py_space).unwrap_or(rest.len());
        words.push(Value::from(&rest[..end]));
        rest = rest[end..].trim_start_matches(py_space);
        left = left.map(|n| n - 1);
    }
    words
}

const RAISED: &str = "raise_exception: ";

/// `raise_exception(msg)`: templates call it to reject a conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

/// `x | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, as
/// transformers defines it (plain `json.dumps`: no HTML escaping, non-ASCII kept).
fn tojson(
    state: &State,
    value: &Value,
    ensure_ascii: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let ensure_ascii = match ensure_ascii {
        Some(b) => b,
        None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = usize::try_from(v)?;
                within_pad_limit(
                    i64::try_from(n).unwrap_or(i64::MAX),
                    format_args!("tojson: indent {n}"),
                )?;
                Some(" ".repeat(n))
            }
        },
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_string(),
                b.as_str().unwrap_or(":").to_string(),
            )
        }
        // json.dumps: ", " without indent, "," with indent.
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys,
        ensure_ascii,
        state,
        charged: std::cell::Cell::new(0),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts<'s> {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
    /// The render's fuel pays for each item visited and the bytes written, so a huge (or lazily
    /// doubled) value or a wide indent ends the render with an error instead of exhausting memory.
    state: &'s State<'s, 's>,
    /// Bytes of the output already paid for.
    charged: std::cell::Cell<usize>,
}

impl JsonOpts<'_> {
    /// Pay for one item and the output written since the last payment (one fuel per 64 bytes,
    /// as minijinja charges its own output).
    fn charge(&self, out: &str) -> Result<(), Error> {
        let new = out.len().saturating_sub(self.charged.get());
        self.charged.set(out.len());
        self.state.consume_fuel(1 + (new / 64) as u64)
    }
}

fn write_json(out: &mut String, v: &Value, o: &JsonOpts, depth: usize) -> Result<(), Error> {
    if depth > 64 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => {
            let _ = write!(out, "{v}");
        }
        ValueKind::Number => {
            let x = f64::try_from(v.clone())?;
            if x.is_nan() {
                out.push_str("NaN");
            } else if x.is_infinite() {
                out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
            } else {
                write_float(out, x);
            }
        }
        ValueKind::Bytes => write_str(
            out,
            &String::from_utf8_lossy(v.as_bytes().unwrap_or_default()),
            o.ensure_ascii,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            // streamed, not collected: a lazy sequence can be far longer than memory
            let mut empty = true;
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                o.charge(out)?;
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, &item, o, depth + 1)?;
                empty = false;
            }
            if !empty {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = Vec::new();
            for k in v.try_iter()? {
                o.charge(out)?;
                keys.push(k);
            }
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                o.charge(out)?;
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_str(out, &k.to_string(), o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &v.get_item(k)?, o, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        // Strings, plain objects and any kind a later minijinja adds: their string form.
        _ => write_str(out, &v.to_string(), o.ensure_ascii),
    }
    Ok(())
}

/// A finite float as Python's `repr` (and so `json.dumps`) writes it: the shortest digits that
/// read back to `x`, `1.0` for whole numbers, exponent form below 1e-4 and from 1e16 on with
/// a signed exponent of at least two digits (`1e-05`, `1.5e+20`). Rust's `{:?}` makes the
/// same choices except for the exponent's spelling (`1e-5`, `1.5e20`).
fn write_float(out: &mut String, x: f64) {
    let s = format!("{x:?}");
    match s.split_once('e') {
        None => out.push_str(&s),
        Some((mantissa, exp)) => {
            let e: i32 = exp.parse().unwrap_or(0);
            let _ = write!(
                out,
                "{mantissa}e{}{:02}",
                if e < 0 { '-' } else { '+' },
                e.abs()
            );
        }
    }
}

/// A JSON string literal with Python's `json.dumps` escapes.
fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current local time (the TZ variable or /etc/localtime, as
/// Python's `datetime.now()` sees it; UTC where the C library cannot tell) with the common
/// strftime directives.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Value::from(strftime(&format, &local_time(secs))))
}

/// A broken-down civil time, as strftime reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CivilTime {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    hour: u32,
    min: u32,
    sec: u32,       // 0..=60 (a leap second)
    weekday: usize, // 0 = Monday
    year_day: u32,  // 1..=366
}

/// UNIX time `secs` in the local time zone, through the C library's `localtime_r` (which reads
/// TZ and /etc/localtime itself, so no time-zone database is bundled); UTC if it fails.
#[cfg(unix)]
fn local_time(secs: u64) -> CivilTime {
    let Ok(t) = libc::time_t::try_from(secs) else {
        return utc_time(secs);
    };
    extern "C" {
        // POSIX; not in the libc crate for every unix
        fn tzset();
    }
    // SAFETY: tzset takes no arguments; it reads TZ (localtime_r need not do so itself).
    unsafe { tzset() };
    // SAFETY: `libc::tm` is a plain C struct of integers and (on some systems) a `tm_zone`
    // pointer, for which all-zero bytes (0 and null) are valid values.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live, properly aligned locals for the duration of the call;
    // localtime_r is the thread-safe variant that writes only into `tm`.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return utc_time(secs);
    }
    let field = |x: libc::c_int| u32::try_from(x).unwrap_or(0);
    CivilTime {
        year: i64::from(tm.tm_year) + 1900,
        month: field(tm.tm_mon) + 1,
        day: field(tm.tm_mday),
        hour: field(tm.tm_hour),
        min: field(tm.tm_min),
        sec: field(tm.tm_sec),
        weekday: (field(tm.tm_wday) as usize + 6) % 7, // tm_wday: 0 = Sunday
        year_day: field(tm.tm_yday) + 1,               // tm_yday: 0 = 1 January
    }
}

#[cfg(not(unix))]
fn local_time(secs: u64) -> CivilTime {
    utc_time(secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Days from 1970-01-01 to 1 January of `year` (proleptic Gregorian).
fn days_from_civil(year: i64) -> i64 {
    let y = year - 1; // 1 January counts as in the previous March-based year
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = 306; // 1 January is day 306 of the year starting 1 March
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// UNIX time `secs` in UTC.
fn utc_time(secs: u64) -> CivilTime {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    CivilTime {
        year,
        month: month as u32,
        day: day as u32,
        hour: (rem / 3600) as u32,
        min: (rem % 3600 / 60) as u32,
        sec: (rem % 60) as u32,
        weekday: (days + 3).rem_euclid(7) as usize, // 1970-01-01 was a Thursday
        year_day: (days - days_from_civil(year) + 1) as u32,
    }
}

/// Format the civil time `t` as Python's `datetime.strftime` does for a naive `datetime.now()`:
/// `%Z` and `%z` are empty (a naive time has no zone). Unknown directives are kept as written.
fn strftime(format: &str, t: &CivilTime) -> String {
    let CivilTime {
        year,
        month,
        day,
        hour,
        min,
        sec,
        weekday,
        year_day,
    } = *t;
    let month_name = MONTHS[(month as usize).clamp(1, 12) - 1];
    let day_name = DAYS[weekday % 7];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('-') if chars.clone().next() == Some('d') => {
                chars.next();
                write!(out, "{day}")
            }
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{day_name}"),
            Some('a') => write!(out, "{}", &day_name[..3]),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => write!(out, "{year_day:03}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('H') => write!(out, "{hour:02}"),
            Some('M') => write!(out, "{min:02}"),
            Some('S') => write!(out, "{sec:02}"),
            Some('%') => write!(out, "%"),
            Some('Z' | 'z') => Ok(()),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChatML as in the PLM-1.8B-Instruct tokenizer_config.json (plm-architecture.md §4).
    const CHATML: &str = "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{%- endif %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

    #[test]
    fn chatml() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true, &[]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[Message::new("system", "S"), Message::new("user", "U")],
                false,
                &[],
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
    }

    /// As Jinja2 reads a template (and so transformers and the Python API): CRLF and CR line
    /// ends are newlines; `{% generation %}` blocks render their body, whitespace control kept;
    /// `tools` and `documents` are defined as none.
    #[test]
    fn crlf_generation_blocks_and_tools_like_transformers() {
        let lf = "{% for m in messages %}\n[{{ m.content }}]\n{% endfor %}\n{{ 'x\ny' }}";
        let crlf = lf.replace('\n', "\r\n");
        let cr = lf.replace('\n', "\r");
        let msgs = [Message::new("user", "a"), Message::new("assistant", "b")];
        let want = ChatTemplate::new(lf)
            .unwrap()
            .render(&msgs, true, &[])
            .unwrap();
        assert_eq!(want, "[a]\n[b]\nx\ny");
        for src in [crlf, cr] {
            let t = ChatTemplate::new(&src).unwrap();
            assert_eq!(t.render(&msgs, true, &[]).unwrap(), want, "{src:?}");
        }
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}<a>\n  {%- generation -%}\n  \
                   {{ m.content }}  {%+ endgeneration %}</a>{% else %}{{ m.content }}{% endif %}{% endfor %}\
                   {% if tools is not none %}T{% endif %}{% if documents is none %}D{% endif %}\
                   {{ '{% generation %}' }}{# {% generation %} #}{% set generationx = 1 %}\
                   {% raw %}{% generation %}{% endraw %}{{ {'k': '}}'}['k'] }}";
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(
            t.render(&msgs, true, &[]).unwrap(),
            "a<a>b  </a>D{% generation %}{% generation %}}}"
        );
    }

    #[test]
    fn non_ascii_anywhere_in_the_source() {
        // closing() walks bytes: a multi-byte character in a comment or outside quotes in an
        // expression once panicked (slicing inside a character)
        let t = ChatTemplate::new(
            "{# café #}{{ messages[0].content }}{% if true %}é{% endif %}{{ 'ü' }}{# ☃ #}",
        )
        .unwrap();
        let m = [Message::new("user", "naïve")];
        assert_eq!(t.render(&m, false, &[]).unwrap(), "naïveéü");
        // a non-ASCII character outside quotes in an expression or tag: minijinja's own
        // verdict (an error here), no panic in our scan before it
        assert!(ChatTemplate::new("{{ é }}").is_err());
        assert!(ChatTemplate::new("{% set x = é %}").is_err());
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(
            t.render(
                &[Message::new("user", "a"), Message::new("user", "b")],
                true,
                &[]
            )
            .unwrap(),
            "[a]\n[b]\n"
        );
    }

    #[test]
    fn special_tokens_pycompat_and_loop_controls() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\
                   {{ m.content.strip().upper() }}{% if m.content.startswith(' x') %}!{% endif %}{{ eos_token }}{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        let msgs = [
            Message::new("user", " xy "),
            Message::new("skip", "no"),
            Message::new("assistant", "z"),
        ];
        let out = t
            .render(&msgs, true, &[("bos_token", "<s>"), ("eos_token", "</s>")])
            .unwrap();
        assert_eq!(out, "<s>XY!</s>Z</s>");
    }

    #[test]
    fn raise_exception_and_errors() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let e = t
            .render(&[Message::new("user", "a")], true, &[])
            .unwrap_err();
        assert_eq!(
            e,
            "the chat template rejected the messages: roles must alternate"
        );
        let e = ChatTemplate::new("{% for %}").err().unwrap();
        assert!(e.starts_with("the chat template is not valid Jinja"), "{e}");
        let t = ChatTemplate::new("{{ messages[0].content.nosuchmethod() }}").unwrap();
        let e = t
            .render(&[Message::new("user", "a")], true, &[])
            .unwrap_err();
        assert!(e.starts_with("rendering the chat template failed"), "{e}");
    }

    #[test]
    fn tojson_like_transformers() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ 'é<' | tojson(ensure_ascii=true) }}").unwrap();
        let out = t
            .render(&[Message::new("user", "a \"q\" <b> é\n")], true, &[])
            .unwrap();
        let (one, rest) = out.split_once('|').unwrap();
        let v: serde_json::Value = serde_json::from_str(one).unwrap();
        assert_eq!(v["content"], "a \"q\" <b> é\n");
        assert!(
            one.contains("<b> é"),
            "no HTML or non-ASCII escaping: {one}"
        );
        assert!(one.contains("\", \""), "Python's ', ' separator: {one}");
        // keys in insertion order, as Python's dicts keep them
        assert!(
            one.starts_with("{\"role\": \"user\", \"content\": "),
            "{one}"
        );
        let (pretty, ascii) = rest.split_once('|').unwrap();
        assert!(pretty.starts_with("[\n  {\n    \""), "{pretty}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(pretty).unwrap()[0]["role"],
            "user"
        );
        assert_eq!(ascii, "\"\\u00e9<\"");
        // numbers as Python's json.dumps writes them (expected text from jinja2 + json.dumps)
        let t = ChatTemplate::new(
            "{{ [1.0, 1e15, 1e16, 1.5e20, 0.0001, 0.00001, 1.5e-7, 1e100, -2.5, 3, -7, 0.1, 2.0 * 3] | tojson }}",
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false, &[]).unwrap(),
            "[1.0, 1000000000000000.0, 1e+16, 1.5e+20, 0.0001, 1e-05, 1.5e-07, 1e+100, -2.5, 3, \
             -7, 0.1, 6.0]"
        );
    }

    fn render_one(src: &str, msgs: &[Message]) -> Result<String, String> {
        ChatTemplate::new(src)?.render(msgs, false, &[])
    }

    /// Each template of `srcs` fails to render `msgs` with an error containing `want`.
    fn assert_each_fails(srcs: &[&str], msgs: &[Message], want: &str) {
        for src in srcs {
            let e = render_one(src, msgs).unwrap_err();
            assert!(e.contains(want), "{src}: {e}");
        }
    }

    /// A template from the model files cannot hang the CLI or exhaust memory: unbounded work
    /// ends in an error (nested loops ran for hours; a doubled string aborted the process).
    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let hi = [Message::new("user", "hi")];
        for src in [
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | join }}",
            "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
            "{% for i in range(100000) %}{{ 'x'.ljust(1048576) }}{% endfor %}",
            // our tojson filter collected a lazy list first: 4.8 GB here (2^30 doubled items:
            // a 24 GiB allocation and an abort)
            "{{ ([0] * 100000000 + [0] * 100000000) | tojson }}",
            "{{ range(100000) | list | tojson(indent=1048576) }}",
        ] {
            let t0 = std::time::Instant::now();
            let e = render_one(src, &hi).unwrap_err();
            assert!(e.contains("more work or memory"), "{src}: {e}");
            assert!(t0.elapsed().as_secs() < 30, "{src}: {:?}", t0.elapsed());
        }
        // a long conversation with the ChatML template stays far inside the budget
        let long: Vec<Message> = (0..2000)
            .map(|i| Message::new(["user", "assistant"][i % 2], &"word ".repeat(200)))
            .collect();
        assert!(ChatTemplate::new(CHATML)
            .unwrap()
            .render(&long, true, &[])
            .is_ok());
    }

    /// The source rewrite (`normalized`, `percent_formats`) and the renderer never panic on
    /// odd text: random templates from pieces that stress the scanner (quotes, escapes,
    /// brackets, `%`, keywords, multi-byte characters, unclosed tags) either render or fail
    /// with an error. A deterministic xorshift draw, so a failure names its input.
    #[test]
    fn random_templates_never_panic() {
        const PIECES: [&str; 58] = [
            "{{",
            "}}",
            "{%",
            "%}",
            "{#",
            "#}",
            "-",
            "'",
            "\"",
            "\\",
            "%",
            "%s",
            "%(",
            "(",
            ")",
            "[",
            "]",
            "{",
            "}",
            ",",
            "|",
            ".",
            " ",
            "\n",
            "is",
            "in",
            "not",
            "x",
            "1",
            "é",
            "ü€",
            "raw",
            "endraw",
            "format",
            "*",
            "**",
            "~",
            "+",
            "0",
            "%%",
            "{%-",
            "-%}",
            "set",
            "if",
            "endif",
            "for",
            "endfor",
            "=",
            ":",
            ":>5",
            "center(",
            ".strip()",
            "strftime_now(",
            "tojson",
            "indent(",
            "messages",
            "[0]",
            ".content",
        ];
        let hi = [Message::new("user", "hi")];
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..20_000 {
            let n = 1 + (next() % 32) as usize;
            let src: String = (0..n)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            let run = std::panic::catch_unwind(|| {
                let _ = percent_formats(&src);
                let _ = render_one(&src, &hi);
            });
            assert!(run.is_ok(), "panicked on {src:?}");
        }
        // found by this test (2 million draws): minijinja's format parser panicked on a
        // non-ASCII character in a printf mapping key or a str.format field index; every
        // non-ASCII character in a spec is now this error (Python renders the first as '1';
        // the second was already an error, with a garbled character)
        assert_each_fails(
            &[
                "{{ '%(é)s' % {'é': 1} }}",
                "{{ '%é' % 1 }}",
                "{{ '{0[é]}'.format({'é': 1}) }}",
            ],
            &hi,
            "non-ASCII character in a format spec",
        );
    }

    /// Python's `'literal' % operand`. Expected text from Python's jinja2 (the project's
    /// ImmutableSandboxedEnvironment from sparselm.tokenizer._compile_template).
    #[test]
    fn percent_formatting_like_jinja2() {
        let hi = [Message::new("user", "hi")];
        let cases = [
            (
                "{{ '%s' % 'x' }}|{{ '[%s|%5s|%-4d|%03d|%.2f]' % ('a', 'b', 7, 5, 3.14159) }}|\
                 {{ 'n=%d' % messages|length }}|{{ '<%s>' % messages[0].content + '!' }}|\
                 {{ '%%|%s' % 3 }}|{{ '%(a)s-%(b)s' % {'a': 1, 'b': 'z'} }}",
                "x|[a|    b|7   |005|3.14]|n=1|<hi>!|%|3|1-z",
            ),
            (
                "{% set x = '%s:%s' % (messages[0].role, messages[0]['content'].upper(),) %}{{ x }}|\
                 {{ 'a' ~ '%s' % ('%d' % 2) }}|{% for m in messages %}\
                 {{- '%s!' % m.content if m.content else 'none' -}}{% endfor %}|\
                 {{ \"%s\" % messages[0].content|upper }}|{{ '%s' % -3 }}|{{ '%s' % (5) }}|\
                 {{ '%s' % ('x',) }}|{{ 'plain' % () }}",
                "user:HI|a2|hi!|HI|-3|5|x|plain",
            ),
            // `%` not after a string literal stays minijinja's remainder
            (
                "{{ 7 % 3 }}|{{ '%' }}|{% if 5 % 2 %}odd{% endif %}|{{ 'a%' ~ 'b' }}|{{ 'x' ~ 10 % 4 }}",
                "1|%|odd|a%b|x2",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(render_one(src, &hi).unwrap(), want, "{src}");
        }
        // errors in jinja2 too (TypeError: not enough arguments for format string); the first
        // is `(2 * '%s') % 3`, which we leave to minijinja
        for src in ["{{ 2 * '%s' % 3 }}", "{{ '%s %s' % messages[0].content }}"] {
            let e = render_one(src, &hi).unwrap_err();
            assert!(e.starts_with("rendering the chat template failed"), "{e}");
        }
        // an `is` test after the operand is not rewritten (jinja2 gives 'True'; we still fail
        // cleanly, as before)
        assert!(render_one("{{ '%s' % messages[0].content is string }}", &hi).is_err());
        // a huge width or precision is an error, not an allocation (minijinja's format filter
        // allocated it: the process aborted)
        assert_each_fails(
            &[
                "{{ '%999999999999s' % 'x' }}",
                "{{ '%(a)-99999999s' % {'a': 1} }}",
                "{{ '%.2000000f' | format(1.5) }}",
                "{{ '{:>99999999999}'.format('x') }}",
            ],
            &hi,
            "above the limit",
        );
        assert_eq!(
            render_one(
                "{{ ('%1048576s' % 'x') | length }}|{{ '{:>5}|{{}}'.format('x') }}|{{ '%%5%s' % 1 }}",
                &hi
            )
            .unwrap(),
            "1048576|    x|{}|%51"
        );
    }

    /// Review findings on the `%` rewrite. Expected text from Python's jinja2 (the project's
    /// `_compile_template`).
    #[test]
    fn percent_rewrite_keeps_tests_lines_and_refuses_extra_arguments() {
        let hi = [Message::new("user", "hi")];
        // after `is` / `is not`, `in` is a test: `('b' is in 'abc') % 2`, not rewritten
        assert_eq!(
            render_one(
                "{{ 'b' is in 'abc' % 2 }}|{{ 'b' is not in 'abc' % 2 }}|{{ 'b' in 'a%sc' % 'b' }}",
                &hi
            )
            .unwrap(),
            "1|0|True"
        );
        // Python: TypeError: not all arguments converted during string formatting
        assert_each_fails(
            &[
                "{{ '%s' % ('a', 'b') }}",
                "{{ '%s %s' % (1, 2, 3) }}",
                "{{ 'a' % 'b' }}",
                "{{ '%%s' % 1 }}",
                "{{ '' % 1 }}",
                "{{ '%s'|format(1, 2) }}",
            ],
            &hi,
            "not all arguments converted",
        );
        // one mapping may go unused, as in Python
        assert_eq!(
            render_one("{{ 'a' % {'k': 1} }}|{{ '%(k)s' % {'k': 1} }}", &hi).unwrap(),
            "a|1"
        );
        // the rewrite keeps the line ends it drops, so a later error names its own line
        let e = render_one("{{ '%s'\n  %\n  1 }}\n{{ nope() }}", &hi).unwrap_err();
        assert!(e.contains("chat_template:4"), "{e}");
        // a huge expression is left as written (and fails as it did) instead of being scanned
        // again from every literal inside it (quadratic: 3 s at this size before)
        let n = 16_000;
        let big = format!("{{{{ {}1{} }}}}", "'s' % (".repeat(n), ") is a".repeat(n));
        assert!(render_one(&big, &hi).is_err());
    }

    /// jinja2's `indent`. Expected text from Python's jinja2 (the project's `_compile_template`).
    #[test]
    fn indent_like_jinja2() {
        let cases = [
            ("[{{ 'a\nb\n\nc\n' | indent }}]", "[a\n    b\n\n    c\n]"),
            ("[{{ 'a\nb\n\nc' | indent(2, true) }}]", "[  a\n  b\n\n  c]"),
            ("[{{ 'a\nb\n\nc' | indent(2, blank=true) }}]", "[a\n  b\n  \n  c]"),
            ("[{{ 'a\r\nb\u{1c}c\u{2028}d' | indent('> ') }}]", "[a\n> b\n> c\n> d]"),
            (
                "[{{ '' | indent(first=true) }}]|[{{ '\n' | indent(width=3, first=true, blank=true) }}]",
                "[    ]|[   \n   ]",
            ),
            ("[{{ 'x\ny' | indent(-2) }}]|[{{ 'x\ny' | indent(0, true) }}]", "[x\ny]|[x\ny]"),
        ];
        for (src, want) in cases {
            assert_eq!(render_one(src, &[]).unwrap(), want, "{src:?}");
        }
        // a huge width is an error, not an allocation that aborts the process
        assert_each_fails(
            &[
                "{{ 'a\nb' | indent(99999999999) }}",
                "{{ messages | tojson(indent=99999999999) }}",
            ],
            &[],
            "above the limit",
        );
        assert!(render_one("{{ 'a' | indent(bogus=1) }}", &[]).is_err());
    }

    #[test]
    fn percent_rewrite_is_textual_and_narrow() {
        assert_eq!(
            percent_formats(" 'a' % x "),
            Some(" 'a'|format((x)) ".into())
        );
        assert_eq!(
            percent_formats("- '%s' % (a, b) -"),
            Some("- '%s'|format(a, b) -".into())
        );
        assert_eq!(
            percent_formats(" x * '%s' % y or '%s' % y "),
            Some(" x * '%s' % y or '%s'|format((y)) ".into())
        );
        for body in [
            " 7 % 3 ",
            " '%' ",
            " 'a' 'b' % c ",
            " '%s' % x is defined ",
            " '%s' % x ** 2 ",
            " '%s' % not x ",
            " '%s' % ",
            " 'unclosed % x",
            " \"é\" ~ 'é' ",
        ] {
            assert_eq!(percent_formats(body), None, "{body}");
        }
        // deep nesting stops rewriting instead of recursing without bound
        let deep = "'%s' % (".repeat(900) + "1" + &")".repeat(900);
        assert!(percent_formats(&deep).is_some());
        // and an expression over 8 KiB is left as written
        let deeper = "'%s' % (".repeat(1000) + "1" + &")".repeat(1000);
        assert_eq!(percent_formats(&deeper), None);
    }

    /// `center`, `ljust`, `rjust`, `zfill`. Expected text from Python's jinja2 / str methods.
    #[test]
    fn padding_methods_like_python() {
        let src = "{{ 'abc'.center(9) }}|{{ 'abc'.center(8, '*') }}|{{ 'ab'.center(7,'-') }}|\
                   {{ 'abc'.center(2) }}|{{ 'abc'.center(-3) }}|{{ 'ab'.ljust(5) }}|\
                   {{ 'ab'.rjust(5,'.') }}|{{ '42'.zfill(5) }}|{{ '-42'.zfill(6) }}|\
                   {{ '+7'.zfill(4) }}|{{ 'é'.center(4,'ü') }}|{{ ''.zfill(3) }}|\
                   {{ '-'.zfill(3) }}|{{ 'x'.ljust(0) }}";
        assert_eq!(
            render_one(src, &[]).unwrap(),
            "   abc   |**abc***|---ab--|abc|abc|ab   |...ab|00042|-00042|+007|üéüü|000|-00|x"
        );
        // jinja2: TypeError: The fill character must be exactly one character long
        let e = render_one("{{ 'a'.center(3, 'ab') }}", &[]).unwrap_err();
        assert!(e.contains("exactly one character"), "{e}");
        assert!(render_one("{{ 'a'.center(3, '') }}", &[]).is_err());
        assert!(render_one("{{ 'a'.center('3') }}", &[]).is_err());
        // a huge width is an error, not an allocation
        assert_each_fails(
            &[
                "{{ 'a'.center(9999999999999) }}",
                "{{ 'a'.zfill(9223372036854775807) }}",
                "{{ 'a'.ljust(1048577) }}",
            ],
            &[],
            "above the limit",
        );
        assert_eq!(
            render_one("{{ 'a'.rjust(1048576) | length }}", &[]).unwrap(),
            "1048576"
        );
    }

    /// `strip`, `lstrip`, `rstrip`, `split` without arguments and `isspace` with Python's
    /// `str.isspace()` characters (U+001C..U+001F too; not U+200B). Expected text from Python's
    /// jinja2 / str methods.
    #[test]
    fn whitespace_like_python() {
        let msgs = [
            Message::new("user", "\u{1f} a\u{1f}b \u{85}\u{1c}"),
            Message::new("user", "\u{200b}\u{3000}x\u{2028}y z\u{1e}"),
        ];
        let src = "{% for m in messages %}[{{ m.content.strip() | tojson }}|\
                   {{ m.content.lstrip() | tojson }}|{{ m.content.rstrip() | tojson }}|\
                   {{ m.content.split() | tojson }}|{{ m.content.split(none, 1) | tojson }}|\
                   {{ m.content.strip(none) | tojson }}|{{ m.content[0].isspace() }}\
                   {{ m.content[-1].isspace() }}]{% endfor %}|{{ ' a b '.split(' ') | tojson }}|\
                   {{ 'xxaxx'.strip('x') }}";
        // jinja2 writes True/False for the booleans, minijinja true/false (as everywhere)
        assert_eq!(
            render_one(src, &msgs).unwrap().to_lowercase(),
            "[\"a\\u001fb\"|\"a\\u001fb \u{85}\\u001c\"|\"\\u001f a\\u001fb\"|[\"a\", \"b\"]|\
             [\"a\", \"b \u{85}\\u001c\"]|\"a\\u001fb\"|truetrue]\
             [\"\u{200b}\u{3000}x\u{2028}y z\"|\"\u{200b}\u{3000}x\u{2028}y z\\u001e\"|\
             \"\u{200b}\u{3000}x\u{2028}y z\"|[\"\u{200b}\", \"x\", \"y\", \"z\"]|\
             [\"\u{200b}\", \"x\u{2028}y z\\u001e\"]|\"\u{200b}\u{3000}x\u{2028}y z\"|falsetrue]|\
             [\"\", \"a\", \"b\", \"\"]|a"
                .to_lowercase()
        );
        assert_eq!(split_whitespace("  a  b  ", Some(-1)).len(), 2);
        assert_eq!(
            split_whitespace("  a  b  c ", Some(1)),
            vec![Value::from("a"), Value::from("b  c ")]
        );
        assert_eq!(split_whitespace("   ", Some(0)), Vec::<Value>::new());
    }

    /// strftime_now uses local time (Python: datetime.now().strftime); `%Z`/`%z` are empty as
    /// for Python's naive datetime.now().
    #[test]
    fn local_time_and_zone_directives() {
        let secs = 1_709_211_909;
        assert_eq!(strftime("[%Z|%z]", &utc_time(secs)), "[|]");
        // localtime_r's fields mapped right: local time is UTC shifted by the zone's offset
        #[cfg(unix)]
        {
            let t = libc::time_t::try_from(secs).unwrap();
            // SAFETY: as in local_time
            let mut tm: libc::tm = unsafe { std::mem::zeroed() };
            // SAFETY: as in local_time
            assert!(!unsafe { libc::localtime_r(&t, &mut tm) }.is_null());
            #[allow(clippy::useless_conversion)] // c_long is i32 on 32-bit targets
            let shifted = secs.checked_add_signed(i64::from(tm.tm_gmtoff)).unwrap();
            assert_eq!(local_time(secs), utc_time(shifted));
        }
    }

    #[test]
    fn strftime_formats() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S", &utc_time(secs)),
            "2024-02-29 13:05:09"
        );
        assert_eq!(
            strftime("%d %b %Y (%A, %B %-d) %% %q", &utc_time(secs)),
            "29 Feb 2024 (Thursday, February 29) % %q"
        );
        assert_eq!(strftime("%Y-%m-%d", &utc_time(0)), "1970-01-01");
        // expected from Python: time.strftime(f, time.gmtime(secs))
        assert_eq!(strftime("%e|%j|%I|%p", &utc_time(secs)), "29|060|01|PM");
        assert_eq!(strftime("%e|%j|%I|%p", &utc_time(0)), " 1|001|12|AM");
        assert_eq!(strftime("%j", &utc_time(1_735_603_200)), "366"); // 2024-12-31
        assert_eq!(strftime("%j %I %p", &utc_time(1_704_110_400)), "001 12 PM");
        // 2024-01-01 12:00
    }
}
