//! Writing the model id into a protobuf message the mesh does not know the schema of, as ModelMesh does
//! for a runtime's own inference methods: the runtime names a string field by its path of field numbers
//! (`idInjectionPath`), and whatever the client put there is replaced with the id the call was routed
//! to. Only the fields on the path are decoded; every other byte passes as it came.

use std::fmt;

use prost::encoding::{MAX_TAG, MIN_TAG, WireType, decode_varint, encode_key, encode_varint};

/// Why an id could not be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError(String);

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `message` with the string field at `path` set to `value`. Embedded messages on the way are edited
/// where present (the last occurrence, which is the one a decoder keeps for a singular field) and
/// created where absent. An empty path leaves the message as it is.
pub fn inject(message: &[u8], path: &[u32], value: &str) -> Result<Vec<u8>, InjectError> {
    let Some((&field, rest)) = path.split_first() else { return Ok(message.to_vec()) };
    if !(MIN_TAG..=MAX_TAG).contains(&field) {
        return Err(InjectError(format!(
            "field number {field} in idInjectionPath is not a protobuf field number"
        )));
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
        && fields[i].wire_type != WireType::LengthDelimited
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

/// Whether `message` already reads `value` at a top-level string field `path` (its last occurrence, the
/// one a decoder keeps): then injecting it changes nothing a decoder sees, and the bytes can pass as they
/// came. The usual case: a client names the model by its id, and `ModelInfer` carries it in field 1.
/// False for a nested path or a malformed message, which take [`inject`]'s way.
pub fn holds(message: &[u8], path: &[u32], value: &str) -> bool {
    let &[field] = path else { return false };
    let Ok(fields) = scan(message) else { return false };
    fields.iter().rev().find(|f| f.number == field).is_some_and(|f| {
        f.wire_type == WireType::LengthDelimited && &message[f.payload.0..f.payload.1] == value.as_bytes()
    })
}

/// One field as it lies in the message.
struct Field {
    number: u32,
    wire_type: WireType,
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
    let mut rest = message;
    while !rest.is_empty() {
        let start = message.len() - rest.len();
        let tag = decode_varint(&mut rest).map_err(|_| malformed("a truncated tag"))?;
        let number = u32::try_from(tag >> 3).map_err(|_| malformed("a field number out of range"))?;
        let wire_type = WireType::try_from(tag & 7).map_err(|_| malformed("an unknown wire type"))?;
        let skip = match wire_type {
            WireType::Varint => {
                decode_varint(&mut rest).map_err(|_| malformed("a truncated varint"))?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                let len = decode_varint(&mut rest).map_err(|_| malformed("a truncated length"))?;
                usize::try_from(len).map_err(|_| malformed("a length out of range"))?
            }
            WireType::StartGroup | WireType::EndGroup => return Err(malformed("a group")),
        };
        let payload_start = message.len() - rest.len();
        rest = rest.get(skip..).ok_or_else(|| malformed("a field that runs past the end"))?;
        if number == 0 {
            return Err(malformed("field number 0"));
        }
        let end = message.len() - rest.len();
        fields.push(Field { number, wire_type, start, end, payload: (payload_start, end) });
    }
    Ok(fields)
}

fn put_length_delimited(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
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
    fn a_message_holding_the_id_already_is_recognised_and_only_then() {
        let message = outer().encode_to_vec();
        assert!(holds(&message, &[16], "old"));
        assert!(!holds(&message, &[16], "new"));
        assert!(!holds(&message, &[3, 1], "client's"), "nested paths take inject's way");
        assert!(!holds(&Outer { id: String::new(), ..outer() }.encode_to_vec(), &[16], ""), "absent field");
        // Two occurrences: a decoder keeps the last, and so does the check.
        let mut twice = message.clone();
        twice.extend_from_slice(&Outer { id: "later".into(), ..Outer::default() }.encode_to_vec());
        assert_eq!(Outer::decode(&twice[..]).unwrap().id, "later");
        assert!(holds(&twice, &[16], "later") && !holds(&twice, &[16], "old"));
        // A scalar with the field's number is not the string.
        assert!(!holds(&outer().encode_to_vec(), &[4], "m"));
        let mut cut = message;
        cut.truncate(cut.len() - 1);
        assert!(!holds(&cut, &[16], "old"), "malformed");
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
