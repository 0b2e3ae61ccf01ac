//! The object-store chunk fetcher (`crates/objstore`) against a real radosgw started by the test.

use faultd_tests::rgw::{Rgw, BUCKET};

#[test]
fn radosgw_starts_and_serves_a_put_object() {
    let rgw = Rgw::start();
    eprintln!("radosgw ready in {:?}", rgw.started_in());
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    std::fs::write(&body, b"hello").unwrap();
    assert_eq!(rgw.put(BUCKET, "k", &body), "200");
}
