fn main() {
    // The config lives at the top of the repository (beside ui/ and icons/), not in this crate.
    tauri_build::try_build(tauri_build::Attributes::new().config_path("../tauri.conf.json"))
        .expect("tauri-build: ../tauri.conf.json");
}
