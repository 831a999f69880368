//! The image-folder loader's decoder (PNG, JPEG, … as `project init` reads them) on
//! arbitrary bytes: an error naming the file or an image, never a panic or a huge allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let origin = std::path::Path::new("fuzz.img");
    if let Ok(img) = mp_core::data::folder::decode_image(data, origin) {
        let chw = mp_core::data::folder::image_to_chw(&img, true);
        assert_eq!(chw.len() as u64, u64::from(img.width()) * u64::from(img.height()));
    }
});
