//! The fuzz target for the pod wire: what a peer (or anything that reaches the gRPC port and sends
//! the wire's magic) writes after the handshake. See [`crate::fuzzing`].

use std::io::Cursor;

use bytes::{Buf, Bytes};

use super::{
    Answer, Frame, FrameReader, ReadSide, TlsIo, decode_answer, decode_call, encode_answer, encode_call,
};

/// A connection's bytes after the magic: the first byte sets the frame limit (16 to ~16 KiB, small
/// so that skipping an oversized frame is reached), the rest is what the peer sent. Every frame the
/// reader yields is decoded both as a call and as an answer; whatever decodes must encode back to a
/// frame that decodes the same, and no frame may be longer than the limit.
pub fn wire_frame(data: &[u8]) {
    let Some((&limit, stream)) = data.split_first() else { return };
    let limit = 16 + usize::from(limit) * 64;
    let io: Box<dyn TlsIo> = Box::new(Cursor::new(stream.to_vec()));
    let (read, _write) = tokio::io::split(io);
    let mut reader = FrameReader::new(ReadSide::Tls(read), limit);
    // The cursor never waits, so no runtime is needed to drive the reader.
    futures::executor::block_on(async {
        loop {
            match reader.next().await {
                Ok(Some(Frame::Whole(frame))) => {
                    assert!((8..=limit).contains(&frame.len()), "a frame of {} bytes", frame.len());
                    call_round_trip(frame.clone());
                    answer_round_trip(frame);
                }
                Ok(Some(Frame::TooLarge { length, .. })) => assert!(length > limit),
                Ok(None) | Err(_) => break,
            }
        }
    });
}

/// The frame after its length field, as the writer's chunks make it.
fn reframed(chunks: [Bytes; 2]) -> Bytes {
    let mut whole = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in &chunks {
        whole.extend_from_slice(chunk);
    }
    let mut whole = Bytes::from(whole);
    let length = whole.get_u32() as usize;
    assert_eq!(length, whole.len(), "the length field counts what follows it");
    whole
}

fn call_round_trip(frame: Bytes) {
    let Ok(call) = decode_call(frame) else { return };
    let chunks =
        encode_call(call.id, &call.path, &call.headers, call.body.clone()).expect("a decoded call encodes");
    let again = decode_call(reframed(chunks)).expect("an encoded call decodes");
    assert_eq!(
        (again.id, &again.path, &again.headers, &again.body),
        (call.id, &call.path, &call.headers, &call.body)
    );
}

fn answer_round_trip(frame: Bytes) {
    let Ok(answer) = decode_answer(frame) else { return };
    let copy = Answer {
        id: answer.id,
        status: answer.status,
        headers: answer.headers.clone(),
        trailers: answer.trailers.clone(),
        body: answer.body.clone(),
    };
    let again = decode_answer(reframed(encode_answer(copy).expect("a decoded answer encodes")))
        .expect("an encoded answer decodes");
    assert_eq!(
        (again.id, again.status, &again.headers, &again.trailers, &again.body),
        (answer.id, answer.status, &answer.headers, &answer.trailers, &answer.body)
    );
}
