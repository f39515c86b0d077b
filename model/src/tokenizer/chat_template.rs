//! Chat templates as Hugging Face runs them, on minijinja: the sandbox set-up
//! ([`compile_chat_template`]: `trim_blocks`, `lstrip_blocks`, `raise_exception`), Jinja2's printing
//! of `True`/`False`/`None`, `|tojson` with Python's `json.dumps` separators, and the Python `str`
//! and `dict` methods templates call (`strip`, `split`, `get`, `items`, ...). Invariant: a template
//! renders here as `transformers`' `apply_chat_template` renders it (the tests compare the
//! SmolLM2, Llama 3 and Qwen2 templates against its output).

use minijinja::value::{from_args, Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, State, Value};
use serde::Serialize;

use super::CHAT_TEMPLATE_NAME;

/// A minijinja environment set up like HF's chat-template sandbox, holding one template; the error
/// is minijinja's compile error.
pub(super) fn compile_chat_template(
    source: String,
) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {message}"),
            ))
        },
    );
    env.add_filter("tojson", tojson);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(python_method);
    env.add_template_owned(CHAT_TEMPLATE_NAME, source)?;
    Ok(env)
}

/// Print values as Jinja2 does (`True`, `False`, `None`), everything else as minijinja does.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let word = match value.kind() {
        ValueKind::Bool if value.is_true() => "True",
        ValueKind::Bool => "False",
        ValueKind::None => "None",
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(word).map_err(minijinja::Error::from)
}

/// serde_json output with Python's `json.dumps` default separators (", " and ": ").
struct PythonJson;

/// `", "` before every element of an array or object but the first (Python's item separator).
fn python_separator<W: ?Sized + std::io::Write>(
    writer: &mut W,
    first: bool,
) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `|tojson` as HF chat templates define it: `json.dumps(x, ensure_ascii=False, indent=indent)`
/// (no HTML escaping, Python's separators). Key order is minijinja's: field order for messages,
/// which is what Python gives too.
pub(super) fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let fail =
        |e: serde_json::Error| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string());
    let mut out = Vec::new();
    match indent {
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonJson);
            value.serialize(&mut ser).map_err(fail)?;
        }
        Some(n) => {
            let pad = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            value.serialize(&mut ser).map_err(fail)?;
        }
    }
    Ok(Value::from_safe_string(
        String::from_utf8(out).expect("serde_json writes UTF-8"),
    ))
}

/// The Python `str` and `dict` methods HF chat templates call (`content.strip()`,
/// `message.get('x')`, `tools.items()`, ...), which minijinja does not have natively.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        match method {
            "items" => {
                let _: () = from_args(args)?;
                return state.apply_filter("items", std::slice::from_ref(value));
            }
            "keys" => {
                let _: () = from_args(args)?;
                return Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()));
            }
            "values" => {
                let _: () = from_args(args)?;
                let values = value
                    .try_iter()?
                    .map(|k| value.get_item(&k))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Value::from(values));
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let found = value.get_item(&key)?;
                return Ok(if found.is_undefined() {
                    default.unwrap_or(Value::from(()))
                } else {
                    found
                });
            }
            _ => {}
        }
    }
    Err(minijinja::Error::new(
        ErrorKind::UnknownMethod,
        format!("{} has no method named {method}", value.kind()),
    ))
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, minijinja::Error> {
    let strip_set = |chars: Option<&str>| {
        let chars = chars.map(|c| c.chars().collect::<Vec<_>>());
        move |c: char| match &chars {
            Some(set) => set.contains(&c),
            None => c.is_whitespace(),
        }
    };
    Ok(match method {
        "strip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_matches(strip_set(chars)))
        }
        "lstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_start_matches(strip_set(chars)))
        }
        "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_end_matches(strip_set(chars)))
        }
        "startswith" => {
            let (prefix,): (&str,) = from_args(args)?;
            Value::from(s.starts_with(prefix))
        }
        "endswith" => {
            let (suffix,): (&str,) = from_args(args)?;
            Value::from(s.ends_with(suffix))
        }
        "upper" => {
            let _: () = from_args(args)?;
            Value::from(s.to_uppercase())
        }
        "lower" => {
            let _: () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "capitalize" => {
            let _: () = from_args(args)?;
            let mut chars = s.chars();
            Value::from(match chars.next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(chars.as_str().to_lowercase().chars())
                    .collect(),
                None => String::new(),
            })
        }
        "title" => {
            let _: () = from_args(args)?;
            let mut out = String::with_capacity(s.len());
            let mut word_start = true;
            for c in s.chars() {
                if word_start {
                    out.extend(c.to_uppercase());
                } else {
                    out.extend(c.to_lowercase());
                }
                word_start = !c.is_alphanumeric();
            }
            Value::from(out)
        }
        "replace" => {
            let (from, to, count): (&str, &str, Option<i64>) = from_args(args)?;
            Value::from(match count {
                Some(n) if n >= 0 => s.replacen(from, to, n as usize),
                _ => s.replace(from, to),
            })
        }
        "split" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let limit = maxsplit.filter(|&n| n >= 0).map(|n| n as usize + 1);
            let parts: Vec<Value> = match (sep, limit) {
                (Some(sep), Some(n)) => s.splitn(n, sep).map(Value::from).collect(),
                (Some(sep), None) => s.split(sep).map(Value::from).collect(),
                (None, limit) => {
                    let words = s.split_whitespace().map(Value::from);
                    match limit {
                        Some(n) => words.take(n).collect(),
                        None => words.collect(),
                    }
                }
            };
            Value::from(parts)
        }
        "find" => {
            let (needle,): (&str,) = from_args(args)?;
            Value::from(
                s.find(needle)
                    .map_or(-1, |byte| s[..byte].chars().count() as i64),
            )
        }
        "count" => {
            let (needle,): (&str,) = from_args(args)?;
            Value::from(s.matches(needle).count())
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::UnknownMethod,
                format!("string has no method named {method}"),
            ))
        }
    })
}
