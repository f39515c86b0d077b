//! Test module `tests` of `tokenizer.rs` (a child module: `super` is `tokenizer`).

use super::*;

/// GPT-2's byte → printable char table (bytes_to_unicode in openai/gpt-2's encoder.py).
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    table
}

fn byte_level(s: &str) -> String {
    let table = byte_chars();
    s.bytes().map(|b| table[b as usize]).collect()
}

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A tiny byte-level vocab: the 256 byte tokens (id = byte), a few merges, the ChatML specials
/// (control) and one user-defined token.
fn synthetic_vocab() -> GgufVocab {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let mut token_types = vec![1i64; 256];
    // (left, right) in byte-level text; each merge's result is appended as a token.
    let merge_pairs: Vec<(String, String)> = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("l", "l"),
        ("he", "ll"),
        ("hell", "o"),
        // é = C3 A9
        (
            byte_level("\u{e9}")
                .chars()
                .next()
                .unwrap()
                .to_string()
                .as_str(),
            "©",
        ),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let mut merges = Vec::new();
    for (a, b) in &merge_pairs {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
        token_types.push(1);
    }
    // 你 = E4 BD A0: two merges building it from bytes.
    let ni = byte_level("你");
    let ni: Vec<char> = ni.chars().collect();
    merges.push(format!("{} {}", ni[0], ni[1]));
    tokens.push(format!("{}{}", ni[0], ni[1]));
    merges.push(format!("{}{} {}", ni[0], ni[1], ni[2]));
    tokens.push(ni.iter().collect());
    token_types.extend([1, 1]);
    for s in SPECIALS {
        tokens.push(s.to_owned());
        token_types.push(TOKEN_TYPE_CONTROL);
    }
    tokens.push("<custom>".to_owned());
    token_types.push(TOKEN_TYPE_USER_DEFINED);
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    GgufVocab {
        model: "gpt2".into(),
        pre: Some("gpt2".into()),
        bos_token_id: Some(id("<|im_start|>")),
        eos_token_id: Some(id("<|im_end|>")),
        unknown_token_id: None,
        padding_token_id: Some(id("<|endoftext|>")),
        add_bos_token: false,
        chat_template: None,
        tokens,
        token_types,
        merges,
    }
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<TokenizerError>();
}

fn synthetic() -> Tokenizer {
    Tokenizer::from_gguf_vocab(synthetic_vocab()).unwrap()
}

const SAMPLES: [&str; 10] = [
    "hello world",
    " the theme of the hello",
    "caf\u{e9} na\u{ef}ve \u{c5}ngstr\u{f6}m \u{e9}\u{e9}",
    "\u{4f60}\u{597d}\u{4e16}\u{754c}\u{ff0c}\u{4f60}",
    "emoji \u{1f600}\u{1f44d}\u{1f3fd}\u{1f1fa}\u{1f1f8} \u{2764}\u{fe0f}",
    "  spaces  \n\ttab\r\n",
    "digits 12345 and 3.14",
    "",
    "<|im_start|>user\nhi<|im_end|>\n",
    "x<custom>y",
];

#[test]
fn synthetic_round_trips() {
    let tok = synthetic();
    for text in SAMPLES {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
    // merges apply: " the" is one token, "é" is one token, "你" is one token
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(tok.encode(" the", false).unwrap(), vec![id("Ġthe")]);
    assert_eq!(tok.encode("hello", false).unwrap(), vec![id("hello")]);
    assert_eq!(
        tok.encode("\u{e9}", false).unwrap(),
        vec![id(&byte_level("\u{e9}"))]
    );
    assert_eq!(
        tok.encode("\u{4f60}", false).unwrap(),
        vec![id(&byte_level("\u{4f60}"))]
    );
    // an emoji with no merges is its four byte tokens
    let smile = tok.encode("\u{1f600}", false).unwrap();
    assert_eq!(smile, vec![0xF0, 0x9F, 0x98, 0x80]);
    assert_eq!(tok.vocab_size(), synthetic_vocab().tokens.len());
}

#[test]
fn synthetic_special_tokens_match_whole() {
    let tok = synthetic();
    let start = tok.token_to_id("<|im_start|>").unwrap();
    let end = tok.token_to_id("<|im_end|>").unwrap();
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&start));
    assert_eq!(ids.last(), Some(&end));
    assert_eq!(ids.iter().filter(|&&i| i == start || i == end).count(), 2);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    let custom = tok.token_to_id("<custom>").unwrap();
    let ids = tok.encode("a<custom>b", false).unwrap();
    assert_eq!(ids, vec![b'a' as u32, custom, b'b' as u32]);
    // user-defined tokens are not special: skip_special keeps them
    assert_eq!(tok.decode(&ids, true).unwrap(), "a<custom>b");
    // stop ids: eos first, then the known names present
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(tok.stop_token_ids(), &[end, eot]);
}

#[test]
fn synthetic_bos_only_when_asked_and_configured() {
    let tok = synthetic();
    let plain = tok.encode("hi", false).unwrap();
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        plain,
        "add_bos_token is false"
    );
    let tok = Tokenizer::from_gguf_vocab(GgufVocab {
        add_bos_token: true,
        ..synthetic_vocab()
    })
    .unwrap();
    let bos = tok.bos_token_id().unwrap();
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        [&[bos][..], &plain].concat()
    );
    assert_eq!(tok.encode("hi", false).unwrap(), plain);
    assert_eq!(tok.encode("", true).unwrap(), vec![bos]);
}

#[test]
fn synthetic_vocab_errors() {
    let err = |v: GgufVocab| Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
    let e = err(GgufVocab {
        model: "llama".into(),
        ..synthetic_vocab()
    });
    assert_eq!(
        e,
        "unsupported tokenizer model \"llama\" (SentencePiece): only gpt2-style BPE is supported"
    );

    let mut v = synthetic_vocab();
    v.merges.push("Ġ zzz".into());
    let e = err(v);
    assert!(
        e.contains("\"Ġ zzz\"") && e.contains("expected \"zzz\" in the vocabulary"),
        "{e}"
    );

    let mut v = synthetic_vocab();
    v.merges.push("a b".into()); // both tokens exist, "ab" does not
    let e = err(v);
    assert!(e.contains("expected \"ab\" in the vocabulary"), "{e}");

    let mut v = synthetic_vocab();
    v.merges.push("nospace".into());
    assert!(err(v).contains("expected two tokens separated by a space"));

    let mut v = synthetic_vocab();
    let n = v.tokens.len();
    v.token_types.pop();
    assert_eq!(
        err(v),
        format!(
            "tokenizer.ggml.token_type has {} entries: expected one per token in \
             tokenizer.ggml.tokens ({n})",
            n - 1
        )
    );

    let e = err(GgufVocab {
        eos_token_id: Some(100_000),
        ..synthetic_vocab()
    });
    assert!(e.starts_with("eos token id 100000 is out of range"), "{e}");

    let mut v = synthetic_vocab();
    v.tokens.push("hello".into());
    v.token_types.push(1);
    assert!(err(v).contains("repeats token"));

    assert!(err(GgufVocab {
        tokens: vec![],
        token_types: vec![],
        merges: vec![],
        bos_token_id: None,
        eos_token_id: None,
        padding_token_id: None,
        ..synthetic_vocab()
    })
    .starts_with("empty vocabulary"));

    let tok = synthetic();
    let bad = tok.vocab_size() as u32;
    assert!(matches!(
        tok.decode(&[1, bad], false),
        Err(TokenizerError::IdOutOfRange { id, .. }) if id == bad
    ));
    assert!(matches!(
        tok.apply_chat_template(&[], true),
        Err(TokenizerError::NoChatTemplate)
    ));
}

/// Push every id; check no piece holds U+FFFD (for valid text) and the pieces add up.
fn stream_all(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
    let mut stream = tok.stream();
    let mut pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    pieces.push(stream.finish().unwrap());
    let whole = pieces.concat();
    (pieces, whole)
}

#[test]
fn stream_never_splits_characters() {
    let tok = synthetic();
    // "é" as its two byte tokens, an emoji as four, and a mix
    let e_acute: Vec<u32> = "\u{e9}".bytes().map(u32::from).collect();
    let (pieces, whole) = stream_all(&tok, &e_acute);
    assert_eq!(pieces, vec!["", "\u{e9}", ""]);
    assert_eq!(whole, "\u{e9}");

    let emoji: Vec<u32> = "a\u{1f980}b".bytes().map(u32::from).collect();
    let (pieces, whole) = stream_all(&tok, &emoji);
    assert_eq!(whole, "a\u{1f980}b");
    assert_eq!(pieces, vec!["a", "", "", "", "\u{1f980}", "b", ""]);

    for text in SAMPLES {
        for ids in [
            tok.encode(text, false).unwrap(),
            text.bytes().map(u32::from).collect::<Vec<_>>(),
        ] {
            let (pieces, whole) = stream_all(&tok, &ids);
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
            assert_eq!(whole, tok.decode(&ids, false).unwrap());
            assert_eq!(whole, text);
        }
    }
}

#[test]
fn stream_matches_decode_on_invalid_bytes() {
    let tok = synthetic();
    // a truncated 3-byte sequence then ASCII; a lone continuation byte; a truncated tail
    for bytes in [
        &[0xE2u8, 0x82, b'A', b'B'][..],
        &[b'x', 0x80, b'y'][..],
        &[b'o', b'k', 0xF0, 0x9F][..],
    ] {
        let ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        let (_, whole) = stream_all(&tok, &ids);
        assert_eq!(whole, tok.decode(&ids, false).unwrap());
        assert_eq!(whole, String::from_utf8_lossy(bytes));
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: 128,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })]
    #[test]
    fn stream_property(text in "\\PC{0,24}", split_bytes in proptest::bool::ANY) {
        let tok = synthetic();
        let ids = if split_bytes {
            text.bytes().map(u32::from).collect()
        } else {
            tok.encode(&text, false).unwrap()
        };
        let (pieces, whole) = stream_all(&tok, &ids);
        // U+FFFD only where the text itself has one (then the pieces add up to the text)
        let clean = pieces.iter().all(|p| !p.contains(char::REPLACEMENT_CHARACTER));
        proptest::prop_assert!(clean || text.contains(char::REPLACEMENT_CHARACTER), "{:?}", pieces);
        proptest::prop_assert_eq!(&whole, &text);
        proptest::prop_assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn smollm2_vocab() -> GgufVocab {
    serde_json::from_str(&fixture("smollm2_vocab.json")).unwrap()
}

#[derive(Deserialize)]
struct Encodings {
    cases: Vec<EncodingCase>,
}

#[derive(Deserialize)]
struct EncodingCase {
    text: String,
    ids: Vec<u32>,
}

const SMOLLM2_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
    trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";

fn check_smollm2(tok: &Tokenizer) {
    let cases: Encodings = serde_json::from_str(&fixture("smollm2_encodings.json")).unwrap();
    assert!(cases.cases.len() >= 12);
    for case in &cases.cases {
        let ids = tok.encode(&case.text, false).unwrap();
        assert_eq!(ids, case.ids, "encoding {:?}", case.text);
        assert_eq!(
            tok.encode(&case.text, true).unwrap(),
            case.ids,
            "add_bos is false"
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), case.text);
        let (pieces, whole) = stream_all(tok, &ids);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(whole, case.text);
    }
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert!(tok.stop_token_ids().contains(&2));
    assert_eq!(tok.stop_token_ids()[0], 2);
    assert!(tok.stop_token_ids().contains(&0), "<|endoftext|>");
    assert_eq!(tok.vocab_size(), 49152);

    assert!(tok.has_chat_template());
    let user = ChatMessage::new("user", "Hi");
    let out = tok
        .apply_chat_template(std::slice::from_ref(&user), true)
        .unwrap();
    assert_eq!(out, SMOLLM2_PROMPT);
    let system = ChatMessage::new(
        "system",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    );
    let out = tok
        .apply_chat_template(&[system, user.clone()], true)
        .unwrap();
    assert_eq!(out, SMOLLM2_PROMPT);
    let out = tok.apply_chat_template(&[user], false).unwrap();
    assert_eq!(
        out,
        SMOLLM2_PROMPT
            .strip_suffix("<|im_start|>assistant\n")
            .unwrap()
    );
    // the rendered prompt tokenizes with the markers as single tokens
    let ids = tok.encode(SMOLLM2_PROMPT, true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
}

#[test]
fn smollm2_fixture_encodings_and_template() {
    let vocab = smollm2_vocab();
    assert_eq!(vocab.model, "gpt2");
    assert_eq!(vocab.pre.as_deref(), Some("smollm"));
    let tok = Tokenizer::from_gguf_vocab(vocab).unwrap();
    check_smollm2(&tok);
}

#[test]
fn smollm2_from_files_matches_gguf() {
    let vocab = smollm2_vocab();
    let template = vocab.chat_template.clone().unwrap();
    let from_gguf = Tokenizer::from_gguf_vocab(vocab).unwrap();
    let dir = std::env::temp_dir().join(format!("vkv-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("tokenizer.json");
    from_gguf.inner.save(&json, false).unwrap();
    let config = dir.join("tokenizer_config.json");
    let config_json = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "add_bos_token": false,
        "chat_template": template,
    });
    std::fs::write(&config, config_json.to_string()).unwrap();
    let tok = Tokenizer::from_files(&json, Some(&config)).unwrap();
    let bare = Tokenizer::from_files(&json, None).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    check_smollm2(&tok);
    assert!(!bare.has_chat_template());
    assert_eq!(bare.bos_token_id(), None);
    assert_eq!(
        bare.encode("Hi", true).unwrap(),
        tok.encode("Hi", false).unwrap()
    );
    let missing = Tokenizer::from_files(Path::new("/nonexistent/tokenizer.json"), None);
    assert!(missing
        .unwrap_err()
        .to_string()
        .starts_with("could not load /nonexistent/tokenizer.json"));
}

fn with_template(template: &str) -> Tokenizer {
    Tokenizer::from_gguf_vocab(GgufVocab {
        chat_template: Some(template.into()),
        ..synthetic_vocab()
    })
    .unwrap()
}

#[test]
fn chat_template_features() {
    let tok = with_template(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversation must start \
         with a system message') }}{% endif %}\
         {% for m in messages %}{{ bos_token }}{{ m.role | upper }}:{{ m['content'].strip() }}|\
         {{ m.content | trim }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% if loop.first %}[first]{% endif %}\
         {% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}",
    );
    let msgs = [
        ChatMessage::new("system", "  be brief \n"),
        ChatMessage::new("user", "\thi "),
    ];
    let out = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>SYSTEM:be brief|be brief\n[first]<|im_start|>USER:hi|hi<|im_end|>"
    );
    let e = tok
        .apply_chat_template(&msgs[1..], false)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("chat template: ")
            && e.contains("Conversation must start with a system message"),
        "{e}"
    );

    // trim_blocks / lstrip_blocks as HF: block tags do not leave their newline and indent
    let tok = with_template(
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
    );
    let out = tok.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(out, "\thi \n");

    // python methods and tojson
    let tok = with_template(
        "{{ messages[0].content.startswith('  be') }},{{ 'a-b-c'.split('-') | join('+') }},\
         {{ 'x'.replace('x', 'y') }},{{ {'k': 1}.get('k') }},{{ {'k': 1}.get('z', 7) }},\
         {{ messages[1] | tojson }},{{ 'hello world'.title() }}",
    );
    let out = tok.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(
        out,
        "True,a+b+c,y,1,7,{\"role\": \"user\", \"content\": \"\\thi \"},Hello World"
    );

    // a template that does not compile is reported when used
    let tok = with_template("{% for m in messages %}");
    assert!(tok.has_chat_template());
    let e = tok.apply_chat_template(&msgs, false).unwrap_err();
    assert!(matches!(e, TokenizerError::ChatTemplate(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.starts_with("chat template: ") && !e.contains("chat template: chat template"),
        "{e}"
    );
}

#[test]
fn pre_tokenizer_families() {
    // llama3: digits in groups of three; smollm: one at a time; gpt2: a run
    let mut v = synthetic_vocab();
    for (a, b) in [("Ġ", "1"), ("Ġ1", "2"), ("1", "2"), ("12", "3")] {
        v.merges.push(format!("{a} {b}"));
        v.tokens.push(format!("{a}{b}"));
        v.token_types.push(1);
    }
    let build = |pre: &str| {
        Tokenizer::from_gguf_vocab(GgufVocab {
            pre: Some(pre.into()),
            ..v.clone()
        })
        .unwrap()
    };
    let id = |tok: &Tokenizer, t: &str| tok.token_to_id(t).unwrap();
    let gpt2 = build("gpt2");
    assert_eq!(gpt2.encode(" 12", false).unwrap(), vec![id(&gpt2, "Ġ12")]);
    let smollm = build("smollm");
    assert_eq!(
        smollm.encode(" 12", false).unwrap(),
        vec![id(&smollm, "Ġ"), b'1' as u32, b'2' as u32]
    );
    let llama3 = build("llama-bpe");
    assert_eq!(
        llama3.encode("1231", false).unwrap(),
        vec![id(&llama3, "123"), b'1' as u32]
    );
    let unknown = build("no-such-pre");
    assert_eq!(
        unknown.encode(" 12", false).unwrap(),
        gpt2.encode(" 12", false).unwrap()
    );
}
