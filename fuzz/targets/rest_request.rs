//! AFL++ target: `densemesh_mesh::fuzzing::rest_request` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_mesh::fuzzing::rest_request(data));
}
