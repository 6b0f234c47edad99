//! AFL++ target: `densemesh_mesh::fuzzing::v2_request` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_mesh::fuzzing::v2_request(data));
}
