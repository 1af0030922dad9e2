//! A topic schema compiled once into a plan: a flat list of nodes whose record fields are
//! positions, not names to look up. Herald's serde types are written and read through it.
//!
//! apache-avro's schema-aware serializer looks every record field up by name (a `BTreeMap`,
//! then a hash map of fields that arrived out of order) and resolves named types on each
//! use; under callgrind that was a third of the cost of writing a decision. Herald's
//! `Serialize` impls write fields in schema order, so the plan only checks that each field is
//! the one it expects. Anything it does not handle the way apache-avro would (fields out of
//! order or left out, a bare value written into a union, a sequence of unknown length) is
//! refused with [`PlanError::Unplanned`], and the caller writes that record with apache-avro
//! instead; `datum.rs` tests check the two write the same bytes for every Herald record.

use apache_avro::schema::{InnerDecimalSchema, Name, UuidSchema};
use apache_avro::Schema;
use serde::de::{
    self, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess, VariantAccess,
    Visitor,
};
use serde::ser::{self, Serialize, SerializeMap, SerializeSeq, SerializeStruct};
use std::collections::HashMap;
use std::fmt;

/// Why a datum could not be written or read through a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The value is valid but takes a shape the plan leaves to apache-avro.
    #[error("not planned: {0}")]
    Unplanned(String),
    /// The value does not fit the schema, or the bytes are not a datum of it.
    #[error("{0}")]
    Invalid(String),
}

impl ser::Error for PlanError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        PlanError::Invalid(msg.to_string())
    }
}

impl de::Error for PlanError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        PlanError::Invalid(msg.to_string())
    }
}

fn unplanned<T>(what: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::Unplanned(what.into()))
}

fn invalid<T>(what: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::Invalid(what.into()))
}

/// Where a node is in [`Plan::nodes`].
type NodeId = usize;

/// One schema node, with logical types reduced to the encoding they share.
#[derive(Debug)]
enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(Vec<String>),
    Array(NodeId),
    Map(NodeId),
    /// `null_at` is the null branch of a two-branch union, the shape of an `Option`.
    Union {
        branches: Vec<NodeId>,
        null_at: Option<u32>,
    },
    Record {
        name: String,
        fields: Vec<(String, NodeId)>,
    },
}

/// A schema compiled into nodes; the root is node 0.
#[derive(Debug)]
pub struct Plan {
    nodes: Vec<Node>,
}

impl Plan {
    /// Compiles `schema`; a reference to a type it does not define is an error.
    pub fn compile(schema: &Schema) -> Result<Plan, PlanError> {
        let mut c = Compiler {
            nodes: Vec::new(),
            named: HashMap::new(),
        };
        c.node(schema)?;
        Ok(Plan { nodes: c.nodes })
    }

    /// Appends the datum of `value` to `out`; on an error `out` may hold part of it.
    pub fn write<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), PlanError> {
        value.serialize(Writer {
            plan: self,
            node: 0,
            out,
        })
    }

    /// Reads one datum from the front of `input`, leaving what follows it.
    pub fn read<'de, T: de::Deserialize<'de>>(
        &self,
        input: &mut &'de [u8],
    ) -> Result<T, PlanError> {
        T::deserialize(Reader {
            plan: self,
            node: 0,
            input,
        })
    }

    fn union_null(&self, node: NodeId) -> Option<(u32, NodeId)> {
        match &self.nodes[node] {
            Node::Union {
                branches,
                null_at: Some(n),
            } => Some((*n, branches[(1 - *n) as usize])),
            _ => None,
        }
    }
}

struct Compiler {
    nodes: Vec<Node>,
    named: HashMap<String, NodeId>,
}

fn full_name(name: &Name) -> String {
    name.fullname(None)
}

impl Compiler {
    fn push(&mut self, n: Node) -> NodeId {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    fn node(&mut self, schema: &Schema) -> Result<NodeId, PlanError> {
        Ok(match schema {
            Schema::Null => self.push(Node::Null),
            Schema::Boolean => self.push(Node::Boolean),
            Schema::Int | Schema::Date | Schema::TimeMillis => self.push(Node::Int),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.push(Node::Long),
            Schema::Float => self.push(Node::Float),
            Schema::Double => self.push(Node::Double),
            Schema::Bytes | Schema::BigDecimal | Schema::Uuid(UuidSchema::Bytes) => {
                self.push(Node::Bytes)
            }
            Schema::Decimal(d) => match &d.inner {
                InnerDecimalSchema::Bytes => self.push(Node::Bytes),
                InnerDecimalSchema::Fixed(f) => self.named(&f.name, Node::Fixed(f.size)),
            },
            Schema::String | Schema::Uuid(UuidSchema::String) => self.push(Node::String),
            Schema::Uuid(UuidSchema::Fixed(f)) | Schema::Duration(f) | Schema::Fixed(f) => {
                self.named(&f.name, Node::Fixed(f.size))
            }
            Schema::Enum(e) => self.named(&e.name, Node::Enum(e.symbols.clone())),
            Schema::Array(a) => {
                let at = self.push(Node::Null);
                self.nodes[at] = Node::Array(self.node(&a.items)?);
                at
            }
            Schema::Map(m) => {
                let at = self.push(Node::Null);
                self.nodes[at] = Node::Map(self.node(&m.types)?);
                at
            }
            Schema::Union(u) => {
                let at = self.push(Node::Null);
                let variants = u.variants();
                let mut branches = Vec::with_capacity(variants.len());
                for v in variants {
                    branches.push(self.node(v)?);
                }
                let null_at = match variants {
                    [Schema::Null, _] => Some(0),
                    [_, Schema::Null] => Some(1),
                    _ => None,
                };
                self.nodes[at] = Node::Union { branches, null_at };
                at
            }
            Schema::Record(r) => {
                // Registered before its fields, so that a field may refer back to it.
                let at = self.named(
                    &r.name,
                    Node::Record {
                        name: r.name.name().to_string(),
                        fields: Vec::new(),
                    },
                );
                let mut fields = Vec::with_capacity(r.fields.len());
                for f in &r.fields {
                    fields.push((f.name.clone(), self.node(&f.schema)?));
                }
                if let Node::Record { fields: slot, .. } = &mut self.nodes[at] {
                    *slot = fields;
                }
                at
            }
            Schema::Ref { name } => match self.named.get(&full_name(name)) {
                Some(at) => *at,
                None => return invalid(format!("{} is used before it is defined", name)),
            },
        })
    }

    fn named(&mut self, name: &Name, node: Node) -> NodeId {
        let at = self.push(node);
        self.named.insert(full_name(name), at);
        at
    }
}

fn put_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

/// Serializes one value at `node` of the plan.
struct Writer<'p, 'o> {
    plan: &'p Plan,
    node: NodeId,
    out: &'o mut Vec<u8>,
}

impl<'p, 'o> Writer<'p, 'o> {
    fn node(&self) -> &'p Node {
        &self.plan.nodes[self.node]
    }

    fn at(&mut self, node: NodeId) -> Writer<'p, '_> {
        Writer {
            plan: self.plan,
            node,
            out: self.out,
        }
    }

    fn long(self, v: i64, ty: &str) -> Result<(), PlanError> {
        match self.node() {
            Node::Long => put_long(self.out, v),
            Node::Int if i32::try_from(v).is_ok() => put_long(self.out, v),
            other => return Err(self.mismatch(ty, other)),
        }
        Ok(())
    }

    fn mismatch(&self, ty: &str, node: &Node) -> PlanError {
        match node {
            // apache-avro picks a union branch for a bare value by its kind; rare, so left to it.
            Node::Union { .. } => PlanError::Unplanned(format!("a bare {ty} written into a union")),
            other => PlanError::Invalid(format!("a {ty} cannot be written as {other:?}")),
        }
    }
}

macro_rules! small_ints {
    ($($f:ident: $t:ty),*) => {$(
        fn $f(self, v: $t) -> Result<(), PlanError> {
            match self.node() {
                Node::Int | Node::Long => put_long(self.out, v as i64),
                other => return Err(self.mismatch(stringify!($t), other)),
            }
            Ok(())
        }
    )*};
}

impl<'p, 'o> ser::Serializer for Writer<'p, 'o> {
    type Ok = ();
    type Error = PlanError;
    type SerializeSeq = Blocks<'p, 'o>;
    type SerializeTuple = ser::Impossible<(), PlanError>;
    type SerializeTupleStruct = ser::Impossible<(), PlanError>;
    type SerializeTupleVariant = ser::Impossible<(), PlanError>;
    type SerializeMap = Blocks<'p, 'o>;
    type SerializeStruct = Fields<'p, 'o>;
    type SerializeStructVariant = ser::Impossible<(), PlanError>;

    fn serialize_bool(self, v: bool) -> Result<(), PlanError> {
        match self.node() {
            Node::Boolean => self.out.push(v as u8),
            other => return Err(self.mismatch("bool", other)),
        }
        Ok(())
    }

    small_ints!(serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_u8: u8, serialize_u16: u16);

    fn serialize_i64(self, v: i64) -> Result<(), PlanError> {
        self.long(v, "i64")
    }

    fn serialize_u32(self, v: u32) -> Result<(), PlanError> {
        self.long(v as i64, "u32")
    }

    fn serialize_u64(self, v: u64) -> Result<(), PlanError> {
        match i64::try_from(v) {
            Ok(v) => self.long(v, "u64"),
            Err(_) => invalid(format!("{v} does not fit an Avro long")),
        }
    }

    fn serialize_f32(self, v: f32) -> Result<(), PlanError> {
        match self.node() {
            Node::Float => self.out.extend_from_slice(&v.to_le_bytes()),
            Node::Double => self.out.extend_from_slice(&(v as f64).to_le_bytes()),
            other => return Err(self.mismatch("f32", other)),
        }
        Ok(())
    }

    fn serialize_f64(self, v: f64) -> Result<(), PlanError> {
        match self.node() {
            Node::Double => self.out.extend_from_slice(&v.to_le_bytes()),
            other => return Err(self.mismatch("f64", other)),
        }
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), PlanError> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, v: &str) -> Result<(), PlanError> {
        match self.node() {
            Node::String => put_bytes(self.out, v.as_bytes()),
            other => return Err(self.mismatch("string", other)),
        }
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), PlanError> {
        match self.node() {
            Node::Bytes => put_bytes(self.out, v),
            Node::Fixed(n) if *n == v.len() => self.out.extend_from_slice(v),
            Node::Fixed(n) => return invalid(format!("{} bytes for a fixed({n})", v.len())),
            other => return Err(self.mismatch("bytes", other)),
        }
        Ok(())
    }

    fn serialize_none(self) -> Result<(), PlanError> {
        match self.plan.union_null(self.node) {
            Some((null_at, _)) => put_long(self.out, null_at as i64),
            None => return invalid("None where the schema has no null"),
        }
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(mut self, value: &T) -> Result<(), PlanError> {
        match self.plan.union_null(self.node) {
            Some((null_at, some)) => {
                put_long(self.out, 1 - null_at as i64);
                value.serialize(self.at(some))
            }
            None => invalid("Some where the schema is not a union with null"),
        }
    }

    fn serialize_unit(self) -> Result<(), PlanError> {
        match self.node() {
            Node::Null => Ok(()),
            other => Err(self.mismatch("unit", other)),
        }
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<(), PlanError> {
        match self.node() {
            Node::Record { name: n, fields } if fields.is_empty() && n == name => Ok(()),
            _ => unplanned(format!("unit struct {name}")),
        }
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<(), PlanError> {
        match self.node() {
            Node::Enum(symbols) => {
                // The variant's position is the symbol's unless serde skipped a variant.
                let at = match symbols.get(index as usize) {
                    Some(s) if s == variant => index as usize,
                    _ => match symbols.iter().position(|s| s == variant) {
                        Some(at) => at,
                        None => return invalid(format!("{variant} is not a symbol of the enum")),
                    },
                };
                put_long(self.out, at as i64);
                Ok(())
            }
            Node::Union { branches, .. }
                if matches!(
                    branches.get(index as usize).map(|b| &self.plan.nodes[*b]),
                    Some(Node::Null)
                ) =>
            {
                put_long(self.out, index as i64);
                Ok(())
            }
            _ => unplanned(format!("unit variant {variant}")),
        }
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), PlanError> {
        match self.node() {
            Node::Record { name: n, fields } if fields.len() == 1 && n == name => {
                let field = fields[0].1;
                value.serialize(self.at(field))
            }
            _ => unplanned(format!("newtype struct {name}")),
        }
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<(), PlanError> {
        // Herald chooses union branches by index (several of its records share a shape).
        match self.node() {
            Node::Union { branches, .. } => match branches.get(index as usize) {
                Some(branch) => {
                    let branch = *branch;
                    put_long(self.out, index as i64);
                    value.serialize(self.at(branch))
                }
                None => invalid(format!(
                    "union branch {index} of {} branches",
                    branches.len()
                )),
            },
            _ => unplanned("a newtype variant outside a union"),
        }
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Blocks<'p, 'o>, PlanError> {
        match (self.node(), len) {
            (Node::Array(items), Some(len)) => Ok(Blocks::start(self.plan, *items, len, self.out)),
            (Node::Array(_), None) => unplanned("a sequence of unknown length"),
            (other, _) => Err(self.mismatch("sequence", other)),
        }
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, PlanError> {
        unplanned("tuple")
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, PlanError> {
        unplanned(format!("tuple struct {name}"))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, PlanError> {
        unplanned(format!("tuple variant {variant}"))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Blocks<'p, 'o>, PlanError> {
        match (self.node(), len) {
            (Node::Map(values), Some(len)) => Ok(Blocks::start(self.plan, *values, len, self.out)),
            (Node::Map(_), None) => unplanned("a map of unknown length"),
            _ => unplanned("a map where the schema has no map"),
        }
    }

    fn serialize_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Fields<'p, 'o>, PlanError> {
        match self.node() {
            Node::Record { fields, .. } => Ok(Fields {
                plan: self.plan,
                fields,
                next: 0,
                out: self.out,
            }),
            _ => unplanned(format!("struct {name} where the schema has no record")),
        }
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, PlanError> {
        unplanned(format!("struct variant {variant}"))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// An array's items or a map's entries, written as one block of known length.
struct Blocks<'p, 'o> {
    plan: &'p Plan,
    item: NodeId,
    out: &'o mut Vec<u8>,
}

impl<'p, 'o> Blocks<'p, 'o> {
    fn start(plan: &'p Plan, item: NodeId, len: usize, out: &'o mut Vec<u8>) -> Self {
        if len > 0 {
            put_long(out, len as i64);
        }
        Blocks { plan, item, out }
    }

    fn item(&mut self) -> Writer<'p, '_> {
        Writer {
            plan: self.plan,
            node: self.item,
            out: self.out,
        }
    }
}

impl SerializeSeq for Blocks<'_, '_> {
    type Ok = ();
    type Error = PlanError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), PlanError> {
        v.serialize(self.item())
    }
    fn end(self) -> Result<(), PlanError> {
        self.out.push(0);
        Ok(())
    }
}

impl SerializeMap for Blocks<'_, '_> {
    type Ok = ();
    type Error = PlanError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), PlanError> {
        k.serialize(MapKey(self.out))
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), PlanError> {
        v.serialize(self.item())
    }
    fn end(self) -> Result<(), PlanError> {
        self.out.push(0);
        Ok(())
    }
}

/// A record's fields, which must come in schema order.
struct Fields<'p, 'o> {
    plan: &'p Plan,
    fields: &'p [(String, NodeId)],
    next: usize,
    out: &'o mut Vec<u8>,
}

impl SerializeStruct for Fields<'_, '_> {
    type Ok = ();
    type Error = PlanError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), PlanError> {
        match self.fields.get(self.next) {
            Some((name, node)) if name == key => {
                self.next += 1;
                v.serialize(Writer {
                    plan: self.plan,
                    node: *node,
                    out: self.out,
                })
            }
            _ => unplanned(format!("field {key} out of schema order")),
        }
    }
    fn end(self) -> Result<(), PlanError> {
        match self.fields.get(self.next) {
            // apache-avro writes a left-out field's default.
            Some((name, _)) => unplanned(format!("field {name} left out")),
            None => Ok(()),
        }
    }
}

/// A map key: Avro map keys are strings.
struct MapKey<'o>(&'o mut Vec<u8>);

/// The serializer methods of a map key that is not a string.
macro_rules! not_a_key {
    ($($f:ident($($t:ty),*) -> $r:ty;)*) => {$(
        fn $f(self, $(_: $t),*) -> Result<$r, PlanError> {
            unplanned("a map key that is not a string")
        }
    )*};
}

impl ser::Serializer for MapKey<'_> {
    type Ok = ();
    type Error = PlanError;
    type SerializeSeq = ser::Impossible<(), PlanError>;
    type SerializeTuple = ser::Impossible<(), PlanError>;
    type SerializeTupleStruct = ser::Impossible<(), PlanError>;
    type SerializeTupleVariant = ser::Impossible<(), PlanError>;
    type SerializeMap = ser::Impossible<(), PlanError>;
    type SerializeStruct = ser::Impossible<(), PlanError>;
    type SerializeStructVariant = ser::Impossible<(), PlanError>;

    fn serialize_str(self, v: &str) -> Result<(), PlanError> {
        put_bytes(self.0, v.as_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), PlanError> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), PlanError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<(), PlanError> {
        v.serialize(self)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), PlanError> {
        unplanned("a map key that is not a string")
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), PlanError> {
        unplanned("a map key that is not a string")
    }
    not_a_key! {
        serialize_bool(bool) -> ();
        serialize_i8(i8) -> ();
        serialize_i16(i16) -> ();
        serialize_i32(i32) -> ();
        serialize_i64(i64) -> ();
        serialize_u8(u8) -> ();
        serialize_u16(u16) -> ();
        serialize_u32(u32) -> ();
        serialize_u64(u64) -> ();
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_bytes(&[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(usize) -> Self::SerializeTuple;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Self::SerializeTupleVariant;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct(&'static str, usize) -> Self::SerializeStruct;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Self::SerializeStructVariant;
    }
}

fn take<'de>(input: &mut &'de [u8], n: usize) -> Result<&'de [u8], PlanError> {
    if input.len() < n {
        return invalid(format!("the datum ends {} bytes early", n - input.len()));
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

fn get_long(input: &mut &[u8]) -> Result<i64, PlanError> {
    let mut z: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some((b, rest)) = input.split_first() else {
            return invalid("the datum ends inside a number");
        };
        *input = rest;
        z |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            if shift == 63 && *b > 1 {
                break;
            }
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    invalid("a number longer than ten bytes")
}

fn get_int(input: &mut &[u8]) -> Result<i32, PlanError> {
    let v = get_long(input)?;
    i32::try_from(v).or_else(|_| invalid(format!("{v} does not fit an Avro int")))
}

fn get_len(input: &mut &[u8]) -> Result<usize, PlanError> {
    let n = get_long(input)?;
    usize::try_from(n).or_else(|_| invalid(format!("a negative length {n}")))
}

fn get_bytes<'de>(input: &mut &'de [u8]) -> Result<&'de [u8], PlanError> {
    let n = get_len(input)?;
    take(input, n)
}

fn get_str<'de>(input: &mut &'de [u8]) -> Result<&'de str, PlanError> {
    std::str::from_utf8(get_bytes(input)?)
        .or_else(|e| invalid(format!("a string that is not UTF-8: {e}")))
}

/// Reads one value at `node` of the plan.
struct Reader<'p, 'de, 'r> {
    plan: &'p Plan,
    node: NodeId,
    input: &'r mut &'de [u8],
}

impl<'p, 'de, 'r> Reader<'p, 'de, 'r> {
    fn node(&self) -> &'p Node {
        &self.plan.nodes[self.node]
    }

    fn at(self, node: NodeId) -> Self {
        Reader { node, ..self }
    }

    fn wrong(&self, wanted: &str) -> PlanError {
        PlanError::Invalid(format!(
            "{wanted} read where the schema has {:?}",
            self.node()
        ))
    }

    /// The branch of the union at this node, its index read.
    fn branch(&mut self) -> Result<(u32, NodeId), PlanError> {
        let Node::Union { branches, .. } = self.node() else {
            return Err(self.wrong("a union"));
        };
        let i = get_long(self.input)?;
        match usize::try_from(i).ok().and_then(|i| branches.get(i)) {
            Some(b) => Ok((i as u32, *b)),
            None => invalid(format!("union branch {i} of {} branches", branches.len())),
        }
    }

    fn number(&mut self) -> Result<i64, PlanError> {
        match self.node() {
            Node::Int => get_int(self.input).map(i64::from),
            Node::Long => get_long(self.input),
            _ => Err(self.wrong("a number")),
        }
    }

    /// Skips a value the reader's type has no field for.
    fn skip(&mut self, node: NodeId) -> Result<(), PlanError> {
        match &self.plan.nodes[node] {
            Node::Null => {}
            Node::Boolean => {
                take(self.input, 1)?;
            }
            Node::Int | Node::Long | Node::Enum(_) => {
                get_long(self.input)?;
            }
            Node::Float => {
                take(self.input, 4)?;
            }
            Node::Double => {
                take(self.input, 8)?;
            }
            Node::Bytes | Node::String => {
                get_bytes(self.input)?;
            }
            Node::Fixed(n) => {
                take(self.input, *n)?;
            }
            Node::Array(item) | Node::Map(item) => {
                let is_map = matches!(self.plan.nodes[node], Node::Map(_));
                loop {
                    let count = get_long(self.input)?;
                    if count == 0 {
                        break;
                    }
                    if count < 0 {
                        // A negative count is followed by the block's size: skip it whole.
                        let size = get_len(self.input)?;
                        take(self.input, size)?;
                        continue;
                    }
                    for _ in 0..count {
                        if is_map {
                            get_bytes(self.input)?;
                        }
                        self.skip(*item)?;
                    }
                }
            }
            Node::Union { branches, .. } => {
                let i = get_long(self.input)?;
                match usize::try_from(i).ok().and_then(|i| branches.get(i)) {
                    Some(b) => self.skip(*b)?,
                    None => {
                        return invalid(format!("union branch {i} of {} branches", branches.len()))
                    }
                }
            }
            Node::Record { fields, .. } => {
                for (_, f) in fields {
                    self.skip(*f)?;
                }
            }
        }
        Ok(())
    }
}

/// Deserializer methods that read what another one reads.
macro_rules! read_as {
    ($($f:ident => $to:ident),* $(,)?) => {$(
        fn $f<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
            self.$to(v)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Reader<'_, 'de, '_> {
    type Error = PlanError;

    read_as! {
        deserialize_i8 => deserialize_i64,
        deserialize_i16 => deserialize_i64,
        deserialize_u8 => deserialize_i64,
        deserialize_u16 => deserialize_i64,
        deserialize_u32 => deserialize_i64,
        deserialize_u64 => deserialize_i64,
        deserialize_char => deserialize_str,
        deserialize_string => deserialize_str,
        deserialize_byte_buf => deserialize_bytes,
        deserialize_identifier => deserialize_str,
    }

    fn deserialize_any<V: Visitor<'de>>(mut self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Null => v.visit_unit(),
            Node::Boolean => self.deserialize_bool(v),
            Node::Int => v.visit_i32(get_int(self.input)?),
            Node::Long => v.visit_i64(get_long(self.input)?),
            Node::Float => self.deserialize_f32(v),
            Node::Double => self.deserialize_f64(v),
            Node::Bytes | Node::Fixed(_) => self.deserialize_bytes(v),
            Node::String => v.visit_borrowed_str(get_str(self.input)?),
            Node::Array(_) => self.deserialize_seq(v),
            Node::Map(_) | Node::Record { .. } => self.deserialize_map(v),
            Node::Enum(_) => self.deserialize_enum("", &[], v),
            Node::Union { .. } => {
                let (_, b) = self.branch()?;
                self.at(b).deserialize_any(v)
            }
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        if !matches!(self.node(), Node::Boolean) {
            return Err(self.wrong("a bool"));
        }
        match take(self.input, 1)?[0] {
            0 => v.visit_bool(false),
            1 => v.visit_bool(true),
            b => invalid(format!("{b} is not a boolean")),
        }
    }

    fn deserialize_i32<V: Visitor<'de>>(mut self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Int => v.visit_i32(get_int(self.input)?),
            _ => v.visit_i64(self.number()?),
        }
    }
    fn deserialize_i64<V: Visitor<'de>>(mut self, v: V) -> Result<V::Value, PlanError> {
        v.visit_i64(self.number()?)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Float => {
                let b = take(self.input, 4)?;
                v.visit_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => self.deserialize_f64(v),
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Double => {
                let mut a = [0; 8];
                a.copy_from_slice(take(self.input, 8)?);
                v.visit_f64(f64::from_le_bytes(a))
            }
            _ => Err(self.wrong("a double")),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::String => v.visit_borrowed_str(get_str(self.input)?),
            _ => Err(self.wrong("a string")),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Bytes => v.visit_borrowed_bytes(get_bytes(self.input)?),
            Node::Fixed(n) => v.visit_borrowed_bytes(take(self.input, *n)?),
            _ => Err(self.wrong("bytes")),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        let Some((null_at, some)) = self.plan.union_null(self.node) else {
            return Err(self.wrong("an option"));
        };
        match get_long(self.input)? {
            i if i == null_at as i64 => v.visit_none(),
            i if i == 1 - null_at as i64 => v.visit_some(self.at(some)),
            i => invalid(format!("union branch {i} of 2 branches")),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Null => v.visit_unit(),
            _ => Err(self.wrong("a unit")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Null => v.visit_unit(),
            Node::Record { fields, .. } if fields.is_empty() => v.visit_unit(),
            _ => Err(self.wrong("a unit struct")),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Record { fields, .. } if fields.len() == 1 => {
                let f = fields[0].1;
                v.visit_newtype_struct(self.at(f))
            }
            _ => v.visit_newtype_struct(self),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Array(item) => v.visit_seq(Items::new(self.plan, *item, self.input)),
            _ => Err(self.wrong("a sequence")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, PlanError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, PlanError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Map(item) => v.visit_map(Items::new(self.plan, *item, self.input)),
            Node::Record { fields, .. } => v.visit_map(RecordFields {
                plan: self.plan,
                fields,
                next: 0,
                input: self.input,
            }),
            _ => Err(self.wrong("a map")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Record { .. } => self.deserialize_map(v),
            _ => Err(self.wrong("a record")),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        mut self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, PlanError> {
        match self.node() {
            Node::Enum(symbols) => {
                let i = get_long(self.input)?;
                match usize::try_from(i).ok().and_then(|i| symbols.get(i)) {
                    Some(symbol) => v.visit_enum(Symbol(symbol)),
                    None => invalid(format!("enum symbol {i} of {}", symbols.len())),
                }
            }
            Node::Union { .. } => {
                let (index, branch) = self.branch()?;
                v.visit_enum(Branch {
                    index,
                    reader: self.at(branch),
                })
            }
            _ => Err(self.wrong("an enum")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(mut self, v: V) -> Result<V::Value, PlanError> {
        self.skip(self.node)?;
        v.visit_unit()
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// An array's items or a map's entries, block by block.
struct Items<'p, 'de, 'r> {
    plan: &'p Plan,
    item: NodeId,
    input: &'r mut &'de [u8],
    left: u64,
    done: bool,
}

impl<'p, 'de, 'r> Items<'p, 'de, 'r> {
    fn new(plan: &'p Plan, item: NodeId, input: &'r mut &'de [u8]) -> Self {
        Items {
            plan,
            item,
            input,
            left: 0,
            done: false,
        }
    }

    /// Whether another item follows, reading the next block's count when one ends.
    fn more(&mut self) -> Result<bool, PlanError> {
        while self.left == 0 && !self.done {
            let count = get_long(self.input)?;
            if count < 0 {
                // A negative count is followed by the block's size in bytes.
                get_len(self.input)?;
            }
            self.left = count.unsigned_abs();
            self.done = count == 0;
        }
        if self.done {
            return Ok(false);
        }
        self.left -= 1;
        Ok(true)
    }
}

impl<'de> Items<'_, 'de, '_> {
    fn value<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, PlanError> {
        seed.deserialize(Reader {
            plan: self.plan,
            node: self.item,
            input: self.input,
        })
    }
}

impl<'de> SeqAccess<'de> for Items<'_, 'de, '_> {
    type Error = PlanError;
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, PlanError> {
        if !self.more()? {
            return Ok(None);
        }
        self.value(seed).map(Some)
    }
}

impl<'de> MapAccess<'de> for Items<'_, 'de, '_> {
    type Error = PlanError;
    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, PlanError> {
        if !self.more()? {
            return Ok(None);
        }
        let key = get_str(self.input)?;
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, PlanError> {
        self.value(seed)
    }
}

/// A record's fields in schema order, each named for the reader's visitor.
struct RecordFields<'p, 'de, 'r> {
    plan: &'p Plan,
    fields: &'p [(String, NodeId)],
    next: usize,
    input: &'r mut &'de [u8],
}

impl<'de> MapAccess<'de> for RecordFields<'_, 'de, '_> {
    type Error = PlanError;
    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, PlanError> {
        match self.fields.get(self.next) {
            Some((name, _)) => seed
                .deserialize(de::value::StrDeserializer::new(name))
                .map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, PlanError> {
        let Some((_, node)) = self.fields.get(self.next) else {
            return invalid("a value read past the record's last field");
        };
        self.next += 1;
        seed.deserialize(Reader {
            plan: self.plan,
            node: *node,
            input: self.input,
        })
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.fields.len() - self.next)
    }
}

/// An enum symbol, named for the reader's variant visitor.
struct Symbol<'p>(&'p str);

impl<'de> EnumAccess<'de> for Symbol<'_> {
    type Error = PlanError;
    type Variant = UnitOnly;
    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, UnitOnly), PlanError> {
        let d: de::value::StrDeserializer<'_, PlanError> = self.0.into_deserializer();
        Ok((seed.deserialize(d)?, UnitOnly))
    }
}

/// The rest of an enum symbol, which carries nothing.
struct UnitOnly;

impl<'de> VariantAccess<'de> for UnitOnly {
    type Error = PlanError;
    fn unit_variant(self) -> Result<(), PlanError> {
        Ok(())
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _: S) -> Result<S::Value, PlanError> {
        invalid("an enum symbol read as a newtype variant")
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, PlanError> {
        invalid("an enum symbol read as a tuple variant")
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, PlanError> {
        invalid("an enum symbol read as a struct variant")
    }
}

/// A union branch: its index names it (several Herald records share a shape).
struct Branch<'p, 'de, 'r> {
    index: u32,
    reader: Reader<'p, 'de, 'r>,
}

impl<'p, 'de, 'r> EnumAccess<'de> for Branch<'p, 'de, 'r> {
    type Error = PlanError;
    type Variant = Reader<'p, 'de, 'r>;
    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), PlanError> {
        let d: de::value::U64Deserializer<PlanError> = (self.index as u64).into_deserializer();
        Ok((seed.deserialize(d)?, self.reader))
    }
}

impl<'de> VariantAccess<'de> for Reader<'_, 'de, '_> {
    type Error = PlanError;
    fn unit_variant(self) -> Result<(), PlanError> {
        match self.node() {
            Node::Null => Ok(()),
            Node::Record { fields, .. } if fields.is_empty() => Ok(()),
            _ => Err(self.wrong("a unit variant")),
        }
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, PlanError> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, PlanError> {
        de::Deserializer::deserialize_tuple(self, len, v)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, PlanError> {
        de::Deserializer::deserialize_map(self, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::writer::datum::GenericDatumWriter;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    const SCHEMA: &str = r#"{"type": "record", "name": "Probe", "namespace": "t", "fields": [
        {"name": "n", "type": "long"},
        {"name": "i", "type": "int"},
        {"name": "ok", "type": "boolean"},
        {"name": "note", "type": ["null", "string"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "seen", "type": {"type": "map", "values": "long"}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B", "C"]}},
        {"name": "next", "type": ["null", "Probe"]}
    ]}"#;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        A,
        C,
        B,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Probe {
        n: i64,
        i: i32,
        ok: bool,
        note: Option<String>,
        tags: Vec<String>,
        seen: BTreeMap<String, i64>,
        kind: Kind,
        next: Option<Box<Probe>>,
    }

    fn probe(n: i64) -> Probe {
        Probe {
            n,
            i: i32::MIN,
            ok: true,
            note: Some("é".into()),
            tags: vec!["x".into(), String::new()],
            seen: [("k".to_string(), i64::MAX)].into(),
            kind: Kind::B,
            next: Some(Box::new(Probe {
                n: -1,
                i: i32::MAX,
                ok: false,
                note: None,
                tags: vec![],
                seen: BTreeMap::new(),
                kind: Kind::C,
                next: None,
            })),
        }
    }

    fn schema() -> Schema {
        Schema::parse_str(SCHEMA).unwrap()
    }

    fn apache(p: &Probe) -> Vec<u8> {
        let s = schema();
        let w = GenericDatumWriter::builder(&s).build().unwrap();
        let mut out = Vec::new();
        w.write_ser(&mut out, p).unwrap();
        out
    }

    #[test]
    fn writes_what_apache_avro_writes_and_reads_it_back() {
        let plan = Plan::compile(&schema()).unwrap();
        for n in [0, 1, -1, 63, -64, 64, i64::MAX, i64::MIN] {
            let p = probe(n);
            let mut out = Vec::new();
            plan.write(&p, &mut out).unwrap();
            assert_eq!(out, apache(&p), "n = {n}");
            let mut rest = &out[..];
            let back: Probe = plan.read(&mut rest).unwrap();
            assert_eq!(back, p);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn reads_blocks_with_byte_sizes_and_skips_fields_it_does_not_know() {
        // A writer may give a block's count negated, followed by its size in bytes.
        let plan = Plan::compile(&schema()).unwrap();
        let mut out = Vec::new();
        plan.write(&probe(5), &mut out).unwrap();
        let mut p = probe(5);
        p.next = None;
        let mut plain = Vec::new();
        plan.write(&p, &mut plain).unwrap();
        // n (1 byte), i (5), ok (1), note (branch, length, two bytes): tags start at 11.
        assert_eq!(&plain[11..16], &[4, 2, b'x', 0, 0]);
        let mut sized = plain[..11].to_vec();
        sized.extend_from_slice(&[3, 6, 2, b'x', 0, 0]);
        sized.extend_from_slice(&plain[16..]);
        let back: Probe = plan.read(&mut &sized[..]).unwrap();
        assert_eq!(back, p);

        #[derive(Deserialize, Debug, PartialEq)]
        struct Narrow {
            n: i64,
            kind: Kind,
        }
        let mut rest = &out[..];
        let narrow: Narrow = plan.read(&mut rest).unwrap();
        assert_eq!(
            narrow,
            Narrow {
                n: 5,
                kind: Kind::B
            }
        );
        assert!(rest.is_empty(), "{} bytes left unskipped", rest.len());
    }

    #[test]
    fn refuses_bytes_that_are_not_a_datum() {
        let plan = Plan::compile(&schema()).unwrap();
        let mut out = Vec::new();
        plan.write(&probe(5), &mut out).unwrap();
        let read = |b: &[u8]| plan.read::<Probe>(&mut &b[..]).map_err(|e| e.to_string());
        assert!(read(&out[..out.len() - 1]).unwrap_err().contains("ends"));
        let overlong = [0xff; 11];
        assert!(read(&overlong)
            .unwrap_err()
            .contains("longer than ten bytes"));
        let mut bad_branch = out[..10].to_vec();
        bad_branch[7] = 4; // the note's union branch: 2 of 2
        assert!(read(&bad_branch).unwrap_err().contains("union branch 2"));
        let mut bad_utf8 = out.clone();
        bad_utf8[9] = 0xff; // the note's second byte
        assert!(read(&bad_utf8).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn leaves_what_it_does_not_plan_to_apache_avro() {
        #[derive(Serialize)]
        struct Partial {
            n: i64,
        }
        let plan = Plan::compile(&schema()).unwrap();
        let err = plan.write(&Partial { n: 1 }, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, PlanError::Unplanned(_)), "{err}");
        let err = plan.write(&"text", &mut Vec::new()).unwrap_err();
        assert!(matches!(err, PlanError::Invalid(_)), "{err}");
    }
}
