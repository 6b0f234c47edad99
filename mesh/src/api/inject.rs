//! Writing the model id into a protobuf message the mesh does not know the schema of, as ModelMesh does
//! for a runtime's own inference methods: the runtime names a string field by its path of field numbers
//! (`idInjectionPath`), and whatever the client put there is replaced with the id the call was routed
//! to. Only the fields on the path are decoded; every other byte passes as it came.

use std::fmt;

/// Why an id could not be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError(String);

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH_DELIMITED: u64 = 2;
const FIXED32: u64 = 5;

/// `message` with the string field at `path` set to `value`. Embedded messages on the way are edited
/// where present (the last occurrence, which is the one a decoder keeps for a singular field) and
/// created where absent. An empty path leaves the message as it is.
pub fn inject(message: &[u8], path: &[u32], value: &str) -> Result<Vec<u8>, InjectError> {
    let Some((&field, rest)) = path.split_first() else { return Ok(message.to_vec()) };
    if field == 0 {
        return Err(InjectError("field number 0 in idInjectionPath".into()));
    }
    let fields = scan(message)?;
    let mut out = Vec::with_capacity(message.len() + value.len() + 8);
    if rest.is_empty() {
        // The string itself: every earlier value goes, the id is the one left.
        for f in fields.iter().filter(|f| f.number != field) {
            out.extend_from_slice(&message[f.start..f.end]);
        }
        put_length_delimited(&mut out, field, value.as_bytes());
        return Ok(out);
    }
    let last = fields.iter().rposition(|f| f.number == field);
    if let Some(i) = last
        && fields[i].wire_type != LENGTH_DELIMITED
    {
        return Err(InjectError(format!("field {field} on the idInjectionPath is not an embedded message")));
    }
    for (i, f) in fields.iter().enumerate() {
        if Some(i) == last {
            let edited = inject(&message[f.payload.0..f.payload.1], rest, value)?;
            put_length_delimited(&mut out, field, &edited);
        } else {
            out.extend_from_slice(&message[f.start..f.end]);
        }
    }
    if last.is_none() {
        put_length_delimited(&mut out, field, &inject(&[], rest, value)?);
    }
    Ok(out)
}

/// One field as it lies in the message.
struct Field {
    number: u32,
    wire_type: u64,
    /// The whole field, tag included.
    start: usize,
    end: usize,
    /// A length-delimited field's contents.
    payload: (usize, usize),
}

fn scan(message: &[u8]) -> Result<Vec<Field>, InjectError> {
    let malformed =
        |what: &str| InjectError(format!("the request is not a well-formed protobuf message: {what}"));
    let mut fields = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let start = at;
        let tag = varint(message, &mut at).ok_or_else(|| malformed("a truncated tag"))?;
        let number = u32::try_from(tag >> 3).map_err(|_| malformed("a field number out of range"))?;
        let wire_type = tag & 7;
        let mut payload = (at, at);
        match wire_type {
            VARINT => {
                varint(message, &mut at).ok_or_else(|| malformed("a truncated varint"))?;
            }
            FIXED64 => at += 8,
            FIXED32 => at += 4,
            LENGTH_DELIMITED => {
                let len = varint(message, &mut at).ok_or_else(|| malformed("a truncated length"))?;
                let len = usize::try_from(len).map_err(|_| malformed("a length out of range"))?;
                payload = (at, at.saturating_add(len));
                at = payload.1;
            }
            _ => return Err(malformed("a group or an unknown wire type")),
        }
        if at > message.len() || number == 0 {
            return Err(malformed("a field that runs past the end"));
        }
        fields.push(Field { number, wire_type, start, end: at, payload });
    }
    Ok(fields)
}

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_length_delimited(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | LENGTH_DELIMITED);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[derive(Clone, PartialEq, Message)]
    struct Inner {
        #[prost(string, tag = "1")]
        model: String,
        #[prost(int64, tag = "2")]
        n: i64,
    }

    #[derive(Clone, PartialEq, Message)]
    struct Outer {
        #[prost(string, tag = "1")]
        text: String,
        #[prost(message, optional, tag = "3")]
        inner: Option<Inner>,
        #[prost(double, tag = "4")]
        x: f64,
        #[prost(fixed32, tag = "5")]
        y: u32,
        #[prost(string, tag = "16")]
        id: String,
    }

    fn outer() -> Outer {
        Outer {
            text: "hello".into(),
            inner: Some(Inner { model: "client's".into(), n: -7 }),
            x: 2.5,
            y: 9,
            id: "old".into(),
        }
    }

    fn injected(message: &Outer, path: &[u32], id: &str) -> Outer {
        Outer::decode(&inject(&message.encode_to_vec(), path, id).unwrap()[..]).unwrap()
    }

    #[test]
    fn the_field_on_the_path_becomes_the_id_and_everything_else_is_kept() {
        assert_eq!(injected(&outer(), &[16], "m-1"), Outer { id: "m-1".into(), ..outer() });
        let nested = injected(&outer(), &[3, 1], "m-2");
        assert_eq!(nested, Outer { inner: Some(Inner { model: "m-2".into(), n: -7 }), ..outer() });
        assert_eq!(injected(&outer(), &[], "m"), outer());
    }

    #[test]
    fn fields_absent_on_the_path_are_created() {
        let bare = Outer { inner: None, id: String::new(), ..outer() };
        assert_eq!(injected(&bare, &[16], "m").id, "m");
        assert_eq!(injected(&bare, &[3, 1], "m").inner, Some(Inner { model: "m".into(), n: 0 }));
        assert_eq!(injected(&Outer::default(), &[3, 1], "m").inner.unwrap().model, "m");
    }

    #[test]
    fn a_path_through_a_scalar_or_a_malformed_message_is_an_error_not_a_guess() {
        let err = inject(&outer().encode_to_vec(), &[4, 1], "m").unwrap_err().to_string();
        assert!(err.contains("field 4") && err.contains("not an embedded message"), "{err}");
        let mut cut = outer().encode_to_vec();
        cut.truncate(cut.len() - 1);
        let err = inject(&cut, &[16], "m").unwrap_err().to_string();
        assert!(err.contains("not a well-formed protobuf message"), "{err}");
        assert!(inject(&[0x0b], &[1], "m").is_err(), "groups are refused");
        assert!(inject(&[], &[0], "m").is_err());
    }
}
