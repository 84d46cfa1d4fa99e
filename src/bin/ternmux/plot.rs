//! A PNG line chart for the concurrency benchmark: concurrency on a log₂ x axis, total
//! throughput on the left axis and average per-query speed on the right, with 8×8 bitmap text.

use font8x8::UnicodeFonts;
use std::path::Path;

const W: usize = 900;
const H: usize = 540;
const LEFT: usize = 90;
const RIGHT: usize = 90;
const TOP: usize = 50;
const BOTTOM: usize = 70;
const BLUE: [u8; 3] = [31, 119, 180];
const RED: [u8; 3] = [214, 39, 40];
const GREY: [u8; 3] = [225, 225, 225];
const BLACK: [u8; 3] = [20, 20, 20];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for dx in -thick / 2..=thick / 2 {
                for dy in -thick / 2..=thick / 2 {
                    self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
                }
            }
        }
    }
    fn dot(&mut self, (x, y): (f64, f64), c: [u8; 3]) {
        for dx in -4i64..=4 {
            for dy in -4i64..=4 {
                if dx * dx + dy * dy <= 16 {
                    self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
                }
            }
        }
    }
    /// Text with its top-left corner at (x, y); `scale` pixels per font pixel.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3], scale: i64) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        for sx in 0..scale {
                            for sy in 0..scale {
                                self.set(
                                    x + (i as i64 * 8 + col) * scale + sx,
                                    y + row as i64 * scale + sy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 8 * scale
    }
}

/// A "nice" axis top: 1, 2 or 5 times a power of ten at or above `v`.
fn nice_top(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&t| t >= v)
        .unwrap_or(10.0 * p)
}

fn label(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Draws the chart and writes it as PNG.
pub fn concurrency_chart(
    path: &Path,
    title: &str,
    levels: &[usize],
    total: &[f64],
    per_query: &[f64],
) -> std::io::Result<()> {
    let mut c = Canvas::new();
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let lmax = nice_top(total.iter().cloned().fold(0.0, f64::max));
    let rmax = nice_top(per_query.iter().cloned().fold(0.0, f64::max));
    let lo = levels.first().map_or(1.0, |&l| (l.max(1) as f64).log2());
    let hi = levels
        .last()
        .map_or(2.0, |&l| (l.max(1) as f64).log2())
        .max(lo + 1.0);
    let x = |l: usize| LEFT as f64 + ((l.max(1) as f64).log2() - lo) / (hi - lo) * pw;
    let yl = |v: f64| TOP as f64 + ph - v / lmax * ph;
    let yr = |v: f64| TOP as f64 + ph - v / rmax * ph;
    // Grid and ticks.
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let y = TOP as f64 + ph - f * ph;
        c.line((LEFT as f64, y), (LEFT as f64 + pw, y), GREY, 1);
        let l = label(lmax * f);
        c.text(
            LEFT as i64 - 8 - Canvas::text_width(&l, 1),
            y as i64 - 4,
            &l,
            BLUE,
            1,
        );
        c.text(
            (LEFT as f64 + pw) as i64 + 8,
            y as i64 - 4,
            &label(rmax * f),
            RED,
            1,
        );
    }
    for &l in levels {
        let xx = x(l);
        c.line((xx, TOP as f64), (xx, TOP as f64 + ph), GREY, 1);
        let s = l.to_string();
        c.text(
            xx as i64 - Canvas::text_width(&s, 1) / 2,
            (TOP as f64 + ph) as i64 + 8,
            &s,
            BLACK,
            1,
        );
    }
    c.line(
        (LEFT as f64, TOP as f64),
        (LEFT as f64, TOP as f64 + ph),
        BLACK,
        2,
    );
    c.line(
        (LEFT as f64 + pw, TOP as f64),
        (LEFT as f64 + pw, TOP as f64 + ph),
        BLACK,
        2,
    );
    c.line(
        (LEFT as f64, TOP as f64 + ph),
        (LEFT as f64 + pw, TOP as f64 + ph),
        BLACK,
        2,
    );
    // Series.
    for (series, y, colour) in [
        (total, &yl as &dyn Fn(f64) -> f64, BLUE),
        (per_query, &yr, RED),
    ] {
        let pts: Vec<(f64, f64)> = levels
            .iter()
            .zip(series)
            .map(|(&l, &v)| (x(l), y(v)))
            .collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], colour, 3);
        }
        for &p in &pts {
            c.dot(p, colour);
        }
    }
    // Titles.
    c.text(LEFT as i64, 14, title, BLACK, 2);
    let xl = "concurrent requests";
    c.text(
        LEFT as i64 + pw as i64 / 2 - Canvas::text_width(xl, 2) / 2,
        H as i64 - 34,
        xl,
        BLACK,
        2,
    );
    c.text(8, H as i64 - 34, "total tok/s", BLUE, 1);
    c.text(8, H as i64 - 20, "(left axis)", BLUE, 1);
    let r1 = "per-query tok/s";
    c.text(
        W as i64 - 8 - Canvas::text_width(r1, 1),
        H as i64 - 34,
        r1,
        RED,
        1,
    );
    let r2 = "(right axis)";
    c.text(
        W as i64 - 8 - Canvas::text_width(r2, 1),
        H as i64 - 20,
        r2,
        RED,
        1,
    );
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(&c.px).map_err(std::io::Error::other)?;
    w.finish().map_err(std::io::Error::other)
}
