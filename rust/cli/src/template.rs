//! Rendering a checkpoint's Jinja chat template with minijinja, the way transformers does.
//!
//! transformers renders `chat_template` in a sandboxed Jinja2 environment with
//! `trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, a `tojson` filter that
//! neither escapes HTML nor non-ASCII, and the globals `raise_exception` and `strftime_now`; the
//! template sees `messages`, `add_generation_prompt` and the special tokens (`bos_token`,
//! `eos_token`, ...). We set up the same here; Python string methods (`.strip()`,
//! `.startswith()`, ...) that templates use come from minijinja-contrib's pycompat layer.
//! This module must not know about token ids or the model.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

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
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
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
            } else {
                format!("rendering the chat template failed: {}", describe(&e))
            }
        })
    }
}

/// The source as Jinja2 (and so transformers) reads it: line ends `\r\n` and `\r` become `\n`,
/// and transformers' `{% generation %}` … `{% endgeneration %}` (which marks the assistant's
/// text for token masks and renders its body unchanged) an always-true `if` block with the same
/// whitespace control. Only tags are rewritten: text inside `{{ }}`, other tags, comments and
/// `{% raw %}` blocks is copied as it is.
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
            Some(at) => i + 2 + at + 2,
            None => b.len(),
        };
    }
    out.push_str(&text[copied..]);
    out
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
fn tojson(value: &Value, ensure_ascii: Option<bool>, kwargs: Kwargs) -> Result<Value, Error> {
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
            None => Some(" ".repeat(usize::try_from(v)?)),
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
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
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
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, o, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
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

/// `strftime_now(format)`: the current time (UTC: no time-zone database on small boards) with
/// the common strftime directives.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Value::from(strftime(&format, secs)))
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

/// Format UNIX time `secs` (UTC). Unknown directives are kept as written.
fn strftime(format: &str, secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (hour, min, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
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
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
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
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => {
                // day of the year: days since 1 January of `year`
                let jan1 = days_from_civil(year);
                write!(out, "{:03}", days - jan1 + 1)
            }
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('H') => write!(out, "{hour:02}"),
            Some('M') => write!(out, "{min:02}"),
            Some('S') => write!(out, "{sec:02}"),
            Some('%') => write!(out, "%"),
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

    #[test]
    fn strftime_formats() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", secs), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y (%A, %B %-d) %% %q", secs),
            "29 Feb 2024 (Thursday, February 29) % %q"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        // expected from Python: time.strftime(f, time.gmtime(secs))
        assert_eq!(strftime("%e|%j|%I|%p", secs), "29|060|01|PM");
        assert_eq!(strftime("%e|%j|%I|%p", 0), " 1|001|12|AM");
        assert_eq!(strftime("%j", 1_735_603_200), "366"); // 2024-12-31
        assert_eq!(strftime("%j %I %p", 1_704_110_400), "001 12 PM"); // 2024-01-01 12:00
    }
}
