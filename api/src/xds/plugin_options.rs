//! Sluice's own settings of a plugin (`sluice.v1.PluginOptions`) as the
//! `google.protobuf.Struct` they travel as in an ECDS resource's VM
//! configuration: a type Envoy knows, so an Envoy that takes the same
//! resource can show it in `/config_dump` (and hands the plugin its bytes
//! in `on_vm_start`, as it does any VM configuration).

use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};

use crate::proto::v1::PluginOptions;

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// The options as a Struct; empty fields are left out.
pub fn to_struct(o: &PluginOptions) -> Struct {
    let mut fields = std::collections::HashMap::new();
    if !o.listeners.is_empty() {
        let values = o.listeners.iter().map(|l| text(l)).collect();
        fields.insert(
            "listeners".to_owned(),
            Value {
                kind: Some(Kind::ListValue(ListValue { values })),
            },
        );
    }
    if o.data {
        fields.insert(
            "data".to_owned(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        );
    }
    for (k, v) in [
        ("deadline", &o.deadline),
        ("max_memory", &o.max_memory),
        ("max_body", &o.max_body),
        ("max_value", &o.max_value),
    ] {
        if !v.is_empty() {
            fields.insert(k.to_owned(), text(v));
        }
    }
    if o.max_pairs != 0 {
        fields.insert(
            "max_pairs".to_owned(),
            Value {
                kind: Some(Kind::NumberValue(o.max_pairs as f64)),
            },
        );
    }
    if !o.upstreams.is_empty() {
        let inner = o.upstreams.iter().map(|(k, v)| (k.clone(), text(v))).collect();
        fields.insert(
            "upstreams".to_owned(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: inner })),
            },
        );
    }
    Struct { fields }
}

/// The options a Struct carries; the error names the field and says what
/// it should be.
pub fn from_struct(s: &Struct) -> Result<PluginOptions, (String, String)> {
    let mut o = PluginOptions::default();
    fn want<T>(k: &str, what: &str) -> Result<T, (String, String)> {
        Err((k.to_owned(), format!("expected {what}")))
    }
    let as_text = |k: &str, v: &Value| match &v.kind {
        Some(Kind::StringValue(s)) => Ok(s.clone()),
        _ => want(k, "text"),
    };
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    for k in keys {
        let Some(v) = s.fields.get(k) else { continue };
        match k.as_str() {
            "listeners" => match &v.kind {
                Some(Kind::ListValue(l)) => {
                    for (i, x) in l.values.iter().enumerate() {
                        o.listeners.push(as_text(&format!("listeners[{i}]"), x)?);
                    }
                }
                _ => return want(k, "a list of listener names"),
            },
            "data" => match v.kind {
                Some(Kind::BoolValue(b)) => o.data = b,
                _ => return want(k, "true or false"),
            },
            "deadline" => o.deadline = as_text(k, v)?,
            "max_memory" => o.max_memory = as_text(k, v)?,
            "max_body" => o.max_body = as_text(k, v)?,
            "max_value" => o.max_value = as_text(k, v)?,
            "max_pairs" => match v.kind {
                Some(Kind::NumberValue(n)) if n >= 0.0 && n.fract() == 0.0 && n <= u32::MAX as f64 => {
                    o.max_pairs = n as u64;
                }
                _ => return want(k, "a whole number"),
            },
            "upstreams" => match &v.kind {
                Some(Kind::StructValue(u)) => {
                    for (name, addr) in &u.fields {
                        o.upstreams
                            .insert(name.clone(), as_text(&format!("upstreams.{name}"), addr)?);
                    }
                }
                _ => return want(k, "a mapping of upstream names to host:port"),
            },
            other => {
                return Err((
                    other.to_owned(),
                    "not a Sluice plugin setting; expected listeners, data, deadline, max_memory, upstreams, max_body, max_pairs or max_value".to_owned(),
                ));
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    #[test]
    fn options_survive_the_trip_and_strangers_are_named() {
        let o = PluginOptions {
            listeners: vec!["a".into(), "b".into()],
            data: true,
            deadline: "20ms".into(),
            max_memory: "1048576".into(),
            upstreams: [("auth".to_owned(), "127.0.0.1:9000".to_owned())].into(),
            max_body: "10".into(),
            max_pairs: 64,
            max_value: "100".into(),
        };
        assert_eq!(from_struct(&to_struct(&o)).unwrap(), o);
        assert_eq!(from_struct(&Struct::default()).unwrap(), PluginOptions::default());
        let mut s = to_struct(&o);
        s.fields.insert("colour".into(), text("blue"));
        assert_eq!(from_struct(&s).unwrap_err().0, "colour");
        let mut s = to_struct(&o);
        s.fields.insert("max_pairs".into(), text("many"));
        assert_eq!(
            from_struct(&s).unwrap_err(),
            ("max_pairs".into(), "expected a whole number".into())
        );
    }
}
