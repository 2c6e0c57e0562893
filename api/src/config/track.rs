//! A serde `Deserializer` wrapper that knows where it is, so one bad value
//! does not hide the next.
//!
//! serde stops at the first problem: an unknown field, an unknown enum
//! value, a value of the wrong type. To report every problem in a file, the
//! loader deserializes again after each one with the offending node skipped
//! (see `config::load_str`). This wrapper does the bookkeeping for that:
//!
//! - it tracks the field path of the node being read (`listeners[1].kind`);
//! - when an error first surfaces, it notes that path (the innermost one);
//! - it skips the keys and sequence elements whose paths it is told to,
//!   reading them as `IgnoredAny` without looking inside.
//!
//! It is transparent otherwise: every call and every value is passed on to
//! the wrapped deserializer and visitor unchanged. `Spanned<T>` (serde-saphyr's
//! position wrapper) is recognised by its marker field and passed through
//! without adding a path segment.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, IntoDeserializer, Visitor};

/// The newtype name serde-saphyr's `Spanned<T>` asks for; its deserializer
/// then offers a synthetic `{value, referenced, defined}` mapping.
const SPANNED: &str = "__yaml_spanned";

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Shared by every wrapper of one deserialization.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    path: RefCell<Vec<Seg>>,
    /// Paths to skip, as rendered by [`render`].
    skip: HashSet<String>,
    /// The innermost path at which an error surfaced.
    failed_at: RefCell<Option<String>>,
}

impl Tracker {
    pub(super) fn new(skip: HashSet<String>) -> Self {
        Self {
            skip,
            ..Self::default()
        }
    }

    /// The path where the error surfaced.
    pub(super) fn failure(&self) -> Option<String> {
        self.failed_at.borrow().clone()
    }

    pub(super) fn into_skip(self) -> HashSet<String> {
        self.skip
    }

    fn note_failure(&self) {
        let mut f = self.failed_at.borrow_mut();
        if f.is_none() {
            *f = Some(render(&self.path.borrow()));
        }
    }

    fn child(&self, seg: Seg) -> String {
        let mut p = self.path.borrow().clone();
        p.push(seg);
        render(&p)
    }

    fn push(&self, seg: Seg) {
        self.path.borrow_mut().push(seg);
    }

    fn pop(&self) {
        self.path.borrow_mut().pop();
    }
}

/// `listeners[0].users[1].name`.
fn render(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

/// `parent.key` in the same rendering.
pub(super) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The wrapped deserializer.
pub(super) struct Track<'t, D> {
    pub(super) de: D,
    pub(super) t: &'t Tracker,
    /// Inside a `Spanned<T>`: the mapping this offers is synthetic.
    pub(super) spanned: bool,
}

impl<'t, D> Track<'t, D> {
    pub(super) fn new(de: D, t: &'t Tracker) -> Self {
        Self { de, t, spanned: false }
    }

    fn wrap<V>(&self, v: V) -> Wrap<'t, V> {
        Wrap {
            v,
            t: self.t,
            mode: if self.spanned { Mode::SpannedMap } else { Mode::Plain },
        }
    }
}

macro_rules! forward {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                let (t, w) = (self.t, self.wrap(visitor));
                self.de.$method(w).inspect_err(|_| t.note_failure())
            }
        )*
    };
}

impl<'de, D: de::Deserializer<'de>> de::Deserializer<'de> for Track<'_, D> {
    type Error = D::Error;

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        let (t, w) = (self.t, self.wrap(visitor));
        self.de
            .deserialize_unit_struct(name, w)
            .inspect_err(|_| t.note_failure())
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        let t = self.t;
        let mut w = self.wrap(visitor);
        if name == SPANNED {
            w.mode = Mode::Spanned;
        }
        self.de
            .deserialize_newtype_struct(name, w)
            .inspect_err(|_| t.note_failure())
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, D::Error> {
        let (t, w) = (self.t, self.wrap(visitor));
        self.de.deserialize_tuple(len, w).inspect_err(|_| t.note_failure())
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let (t, w) = (self.t, self.wrap(visitor));
        self.de
            .deserialize_tuple_struct(name, len, w)
            .inspect_err(|_| t.note_failure())
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let (t, w) = (self.t, self.wrap(visitor));
        self.de
            .deserialize_struct(name, fields, w)
            .inspect_err(|_| t.note_failure())
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let (t, w) = (self.t, self.wrap(visitor));
        self.de
            .deserialize_enum(name, variants, w)
            .inspect_err(|_| t.note_failure())
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

/// The wrapped visitor: wraps what it is handed to descend into.
struct Wrap<'t, V> {
    v: V,
    t: &'t Tracker,
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    /// Visiting a `Spanned<T>` newtype: what it hands over is its own
    /// deserializer.
    Spanned,
    /// The mapping a `Spanned<T>` offers: no path segment, no skipping.
    SpannedMap,
}

macro_rules! visit_plain {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.v.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.v.expecting(f)
    }

    visit_plain!(
        visit_bool: bool,
        visit_i8: i8,
        visit_i16: i16,
        visit_i32: i32,
        visit_i64: i64,
        visit_i128: i128,
        visit_u8: u8,
        visit_u16: u16,
        visit_u32: u32,
        visit_u64: u64,
        visit_u128: u128,
        visit_f32: f32,
        visit_f64: f64,
        visit_char: char,
        visit_str: &str,
        visit_borrowed_str: &'de str,
        visit_string: String,
        visit_bytes: &[u8],
        visit_borrowed_bytes: &'de [u8],
        visit_byte_buf: Vec<u8>,
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.v.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.v.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.v.visit_some(Track::new(d, self.t))
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let mut inner = Track::new(d, self.t);
        inner.spanned = self.mode == Mode::Spanned;
        self.v.visit_newtype_struct(inner)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.v.visit_seq(SeqTrack {
            seq,
            t: self.t,
            index: 0,
        })
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.v.visit_map(MapTrack {
            map,
            t: self.t,
            transparent: self.mode == Mode::SpannedMap,
            pushed: false,
        })
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.v.visit_enum(data)
    }
}

/// A seed that deserializes through [`Track`].
struct Seed<'t, S> {
    seed: S,
    t: &'t Tracker,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.seed.deserialize(Track::new(d, self.t))
    }
}

struct SeqTrack<'t, A> {
    seq: A,
    t: &'t Tracker,
    /// Index in the file, skipped elements included.
    index: usize,
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for SeqTrack<'_, A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, A::Error> {
        loop {
            let i = self.index;
            self.index += 1;
            if self.t.skip.contains(&self.t.child(Seg::Index(i))) {
                if self.seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(None);
                }
                continue;
            }
            self.t.push(Seg::Index(i));
            let r = self.seq.next_element_seed(Seed { seed, t: self.t });
            if r.is_err() {
                self.t.note_failure();
            }
            self.t.pop();
            return r;
        }
    }
}

struct MapTrack<'t, A> {
    map: A,
    t: &'t Tracker,
    transparent: bool,
    /// A key's segment is on the path until its value is read.
    pushed: bool,
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for MapTrack<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        if self.transparent {
            return self.map.next_key_seed(Seed { seed, t: self.t });
        }
        loop {
            let Some(key) = self.map.next_key::<String>()? else {
                return Ok(None);
            };
            if self.t.skip.contains(&self.t.child(Seg::Key(key.clone()))) {
                self.map.next_value::<IgnoredAny>()?;
                continue;
            }
            self.t.push(Seg::Key(key.clone()));
            self.pushed = true;
            return seed
                .deserialize(key.into_deserializer())
                .map(Some)
                .inspect_err(|_| self.t.note_failure());
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        let r = self.map.next_value_seed(Seed { seed, t: self.t });
        if r.is_err() {
            self.t.note_failure();
        }
        if std::mem::take(&mut self.pushed) {
            self.t.pop();
        }
        r
    }
}
