//! Chat formats and KV reuse across turns.

use ternmux::chat::{Chat, ChatFormat, Message};
use ternmux::model::{GenerateOptions, Model};
use ternmux::synth::{Shape, SynthSpec, write_synthetic};

fn tiny(arch: &str) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = SynthSpec {
        arch: arch.into(),
        shape: Shape::preset("tiny").unwrap(),
        format: ternmux::kernels::ternary::TernaryFormat::Tq2_0,
        seed: 3,
    };
    write_synthetic(&spec, &path).unwrap();
    let m = Model::open(&path).unwrap();
    (dir, m)
}

#[test]
fn bitnet_2b4t_form_without_template() {
    let (_d, m) = tiny("bitnet-b1.58");
    let f = ChatFormat::for_model(&m);
    assert!(matches!(f, ChatFormat::Bitnet));
    let s = f
        .render(
            &m,
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
        )
        .unwrap();
    assert_eq!(
        s,
        "<s>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: "
    );
}

#[test]
fn jinja_template_renders_messages() {
    let f = ChatFormat::Template(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
            .into(),
    );
    let (_d, m) = tiny("llama");
    let s = f.render(&m, &[Message::new("user", "2+2?")]).unwrap();
    assert_eq!(s, "<s>[user] 2+2?\n[assistant]");
    let bad = ChatFormat::Template("{{ raise_exception('no system role') }}".into());
    assert!(
        bad.render(&m, &[])
            .unwrap_err()
            .to_string()
            .contains("no system role")
    );
}

#[test]
fn second_turn_reuses_the_cache() {
    let (_d, m) = tiny("bitnet");
    let mut chat = Chat::new(
        &m,
        GenerateOptions {
            max_tokens: 5,
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    let first = chat.say("hello there friend", |_| true).unwrap();
    let second = chat.say("and again", |_| true).unwrap();
    assert!(first.new_prompt_tokens > 0);
    // Only the new turn (plus any re-tokenized reply) runs, not the whole conversation.
    let total = m
        .tokenizer
        .encode(
            &chat
                .format()
                .render(
                    &m,
                    &[
                        Message::new("user", "hello there friend"),
                        Message::new("assistant", first.text.trim()),
                        Message::new("user", "and again"),
                    ],
                )
                .unwrap(),
            true,
            true,
        )
        .len();
    assert!(
        second.new_prompt_tokens < total,
        "{} of {total}",
        second.new_prompt_tokens
    );
}
