//! The checked-in `cis2_client.h` must be what cbindgen makes of the code: a header that drifted
//! from the library would let an EHR compile calls that crash at run time.

use std::path::Path;

#[test]
fn the_checked_in_header_is_what_cbindgen_generates_from_the_code() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/codes.rs"))
        .with_src(crate_dir.join("src/client.rs"))
        .with_src(crate_dir.join("src/ffi.rs"))
        .generate()
        .expect("cbindgen reads the library's source")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = crate_dir.join("cis2_client.h");
    if std::env::var_os("CIS2_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "crates/c-client/cis2_client.h differs from what the code declares; if the change to the \
         C interface is meant (and docs/ehr-integration.md says so), regenerate it with \
         CIS2_UPDATE_HEADER=1 cargo test -p cis2-c-client --test header"
    );
}
