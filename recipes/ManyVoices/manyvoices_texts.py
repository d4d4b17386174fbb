"""Text sources of ManyVoices: sentences in several languages, disjoint between the data splits.

Sources (each sentence belongs to exactly one split):

* ``template``: random sentences from small hand-written grammars in English (MiniMix's templates
  and word lists, imported), German, French, Spanish, Italian, Portuguese, Dutch, Finnish, Czech,
  Catalan, Russian, Hindi and Japanese (kana only, which every engine reads). The nouns of each
  language come from three disjoint pools (train / valid / test), so no sentence, not even a noun,
  is shared between splits.
* ``zen``: the Zen of Python, from the source of Python's own ``this`` module (read, not imported:
  importing it prints).
* ``license``: sentences of the license texts in ``/usr/share/common-licenses`` (Debian base-files).
* ``festival-doc``: festival's example texts (``/usr/share/doc/festival/examples/intro.text``,
  English, and ``spintro.text``, Spanish), when festival is installed.
* ``locale``: phrases in the languages without a grammar here (Marathi, Telugu, Polish, Swedish,
  Korean, ...): language and country names and the names of days and months from the glibc locale
  sources in ``/usr/share/i18n/locales`` (Debian package ``locales``), when present.

Corpus sentences go to a split by a hash of their text (10 % valid, 10 % test), independent of the
seed. A source is drawn in proportion to its size (a grammar counts as 100 sentences). Every file is opened through :func:`read_source`, which refuses the reserved paths
(held-out human recordings, see ``RESERVED``).
"""

import codecs
import functools
import hashlib
import importlib.util
import os
import re

import numpy as np

SPLITS = ("train", "valid", "test")
MINIMIX_SPLIT = {"train": "tr", "valid": "cv", "test": "tt"}
TEMPLATE_WEIGHT = 100  # a grammar counts as a corpus of this many sentences when a source is drawn

#: Held out for evaluation on real recordings: never read, whatever the option or text file given.
RESERVED = (
    "/usr/share/asterisk",
    "/var/lib/asterisk",
    "/usr/share/sounds/alsa",
    "/usr/share/codec2",
    "/usr/share/doc/codec2",
    "/usr/share/pocketsphinx",
    "/usr/share/doc/pocketsphinx",
)
#: Path pieces refused anywhere (Python packages with test or sample recordings).
RESERVED_PARTS = ("/asterisk/", "/codec2/", "/pocketsphinx/", "/pyannote/audio/sample", "/alsa/", "/sounds/alsa")


class ReservedPathError(ValueError):
    """A voice or text source lies under a reserved (held-out) path."""


def check_not_reserved(path):
    """Raise :class:`ReservedPathError` if ``path`` (or what it links to) is a reserved source."""
    candidates = {os.path.abspath(str(path)), os.path.realpath(str(path))}
    for p in candidates:
        low = p.lower() + ("/" if os.path.isdir(p) else "")
        if any(low == r or low.startswith(r + "/") for r in RESERVED) or any(part in low for part in RESERVED_PARTS):
            raise ReservedPathError(
                f"{path} is a reserved held-out source (asterisk prompts, alsa sounds, codec2 / pocketsphinx "
                "/ pyannote samples); ManyVoices never reads it"
            )
    return str(path)


def read_source(path, encoding="utf-8"):
    """The text of ``path`` after the reserved-path check (the only way this recipe reads a file)."""
    check_not_reserved(path)
    with open(path, encoding=encoding, errors="replace") as f:
        return f.read()


def split_of(text):
    """The split of a corpus sentence: a stable hash of its text, 10 % valid, 10 % test."""
    h = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 20
    return "valid" if h < 2 else "test" if h < 4 else "train"


# --------------------------------------------------------------------------- grammars
# Each language: templates with {n1} {n2} (noun phrases), {a} (an adjective whose form does not
# depend on the nouns' gender) and {p} (a name); nouns split train / valid / test.
GRAMMARS = {
    "de": {
        "templates": (
            "{n1} und {n2} sind heute {a}.",
            "{p} sagt, {n1} und {n2} waren gestern sehr {a}.",
            "Am Morgen waren {n1} und {n2} ganz {a}.",
            "Warum sind {n1} und {n2} so {a}, fragt {p}.",
        ),
        "adjectives": "leise laut alt neu schön klein groß müde warm kalt hell dunkel".split(),
        "names": "Anna Peter Lena Jonas Greta Felix Paula Lukas".split(),
        "nouns": {
            "train": ("der Fluss|die Lampe|das Fenster|der Garten|die Küche|das Auto|der Lehrer|die Brücke|"
                      "das Dorf|der Apfel|die Katze|der Tisch|die Straße|das Schiff").split("|"),
            "valid": "der Hafen|die Geige|das Zelt|der Anker".split("|"),
            "test": "der Wald|die Insel|das Schloss|der Kompass".split("|"),
        },
    },
    "fr": {
        "templates": (
            "{n1} et {n2} sont {a} aujourd'hui.",
            "{p} dit que {n1} et {n2} étaient très {a} hier.",
            "Ce matin, {n1} et {n2} semblaient {a}.",
            "Pourquoi {n1} et {n2} sont-ils si {a}, demande {p}.",
        ),
        "adjectives": "calmes rapides jaunes rouges célèbres énormes fragiles utiles tranquilles magnifiques".split(),
        "names": "Marie Pierre Claire Louis Julie Hugo Camille Paul".split(),
        "nouns": {
            "train": ("la rivière|le jardin|la fenêtre|le marché|la cuisine|le village|la bouteille|le moteur|"
                      "la lettre|le château|la montagne|le bateau|la pomme|le crayon").split("|"),
            "valid": "le port|la guitare|le dragon|la cabane".split("|"),
            "test": "la forêt|le désert|la statue|le pirate".split("|"),
        },
    },
    "es": {
        "templates": (
            "{n1} y {n2} están muy {a} hoy.",
            "{p} dice que {n1} y {n2} eran {a} ayer.",
            "Esta mañana {n1} y {n2} parecían {a}.",
            "¿Por qué {n1} y {n2} son tan {a}?, pregunta {p}.",
        ),
        "adjectives": "grandes verdes tristes alegres azules enormes felices útiles fuertes dulces".split(),
        "names": "María Juan Lucía Carlos Elena Diego Sofía Pablo".split(),
        "nouns": {
            "train": ("el río|la ventana|el jardín|la cocina|el mercado|la botella|el pueblo|la carta|"
                      "el puente|la montaña|el barco|la manzana|el lápiz|la torre").split("|"),
            "valid": "el puerto|la guitarra|el dragón|la cabaña".split("|"),
            "test": "el bosque|la isla|el desierto|la estatua".split("|"),
        },
    },
    "it": {
        "templates": (
            "{n1} e {n2} sono molto {a} oggi.",
            "{p} dice che {n1} e {n2} erano {a} ieri.",
            "Stamattina {n1} e {n2} sembravano {a}.",
            "Perché {n1} e {n2} sono così {a}, chiede {p}.",
        ),
        "adjectives": "grandi verdi tristi felici veloci forti dolci celebri gentili semplici".split(),
        "names": "Giulia Marco Chiara Luca Sara Matteo Elena Paolo".split(),
        "nouns": {
            "train": ("il fiume|la finestra|il giardino|la cucina|il mercato|la bottiglia|il villaggio|la lettera|"
                      "il ponte|la montagna|il treno|la mela|il libro|la torre").split("|"),
            "valid": "il porto|la chitarra|il drago|la capanna".split("|"),
            "test": "il bosco|l'isola|il deserto|la statua".split("|"),
        },
    },
    "pt": {
        "templates": (
            "{n1} e {n2} estão muito {a} hoje.",
            "{p} diz que {n1} e {n2} eram {a} ontem.",
            "Esta manhã {n1} e {n2} pareciam {a}.",
            "Por que {n1} e {n2} são tão {a}, pergunta {p}.",
        ),
        "adjectives": "grandes verdes tristes felizes azuis enormes fortes simples alegres gentis".split(),
        "names": "Ana João Beatriz Pedro Inês Tiago Marta Rui".split(),
        "nouns": {
            "train": ("o rio|a janela|o jardim|a cozinha|o mercado|a garrafa|o povoado|a carta|"
                      "o barco|a montanha|o comboio|a maçã|o livro|a torre").split("|"),
            "valid": "o porto|a guitarra|o dragão|a cabana".split("|"),
            "test": "o bosque|a ilha|o deserto|a estátua".split("|"),
        },
    },
    "nl": {
        "templates": (
            "{n1} en {n2} zijn vandaag erg {a}.",
            "{p} zegt dat {n1} en {n2} gisteren {a} waren.",
            "Vanmorgen waren {n1} en {n2} heel {a}.",
            "Waarom zijn {n1} en {n2} zo {a}, vraagt {p}.",
        ),
        "adjectives": "stil luid oud nieuw mooi klein groot moe warm koud licht donker".split(),
        "names": "Anne Pieter Sanne Daan Lotte Bram Eva Thijs".split(),
        "nouns": {
            "train": ("de rivier|het raam|de tuin|de keuken|de markt|de fles|het dorp|de brief|"
                      "de brug|de berg|de trein|de appel|het boek|de toren").split("|"),
            "valid": "de haven|de gitaar|de draak|de hut".split("|"),
            "test": "het bos|het eiland|de woestijn|het standbeeld".split("|"),
        },
    },
    "fi": {
        "templates": (
            "{n1} ja {n2} ovat tänään {a}.",
            "{p} sanoo, että {n1} ja {n2} olivat eilen {a}.",
            "Aamulla {n1} ja {n2} olivat hyvin {a}.",
            "Miksi {n1} ja {n2} ovat niin {a}, kysyy {p}.",
        ),
        "adjectives": "suuria pieniä kauniita vanhoja uusia hiljaisia kylmiä lämpimiä".split(),
        "names": "Aino Mikko Helmi Juho Sanna Ville Emma Antti".split(),
        "nouns": {
            "train": "joki ikkuna puutarha keittiö tori pullo kylä kirje silta vuori juna omena kirja torni".split(),
            "valid": "satama kitara lohikäärme mökki".split(),
            "test": "metsä saari aavikko patsas".split(),
        },
    },
    "cs": {
        "templates": (
            "{n1} a {n2} jsou dnes {a}.",
            "{p} říká, že {n1} a {n2} byly včera {a}.",
            "Ráno byly {n1} a {n2} velmi {a}.",
            "Proč jsou {n1} a {n2} tak {a}, ptá se {p}.",
        ),
        "adjectives": "moderní letní zimní cizí domácí jarní podzimní první".split(),
        "names": "Jana Petr Eva Tomáš Lucie Jakub Tereza Martin".split(),
        "nouns": {
            "train": "řeka okno zahrada kuchyně trh láhev vesnice dopis most hora vlak jablko kniha věž".split(),
            "valid": "přístav kytara drak chata".split(),
            "test": "les ostrov poušť socha".split(),
        },
    },
    "ca": {
        "templates": (
            "{n1} i {n2} són molt {a} avui.",
            "{p} diu que {n1} i {n2} eren {a} ahir.",
            "Aquest matí {n1} i {n2} semblaven {a}.",
            "Per què {n1} i {n2} són tan {a}, pregunta {p}.",
        ),
        "adjectives": "grans joves alegres enormes útils fàcils febles".split(),
        "names": "Laia Jordi Marta Pau Núria Marc Anna Joan".split(),
        "nouns": {
            "train": ("el riu|la finestra|el jardí|la cuina|el mercat|l'ampolla|el poble|la carta|"
                      "el pont|la muntanya|el tren|la poma|el llibre|la torre").split("|"),
            "valid": "el port|la guitarra|el drac|la cabana".split("|"),
            "test": "el bosc|l'illa|el desert|l'estàtua".split("|"),
        },
    },
    "ru": {
        "templates": (
            "{n1} и {n2} сегодня очень {a}.",
            "{p} говорит, что {n1} и {n2} были {a}.",
            "Утром {n1} и {n2} были совсем {a}.",
            "Почему {n1} и {n2} такие {a}, спрашивает {p}.",
        ),
        "adjectives": "большие новые старые красивые тихие холодные тёплые маленькие".split(),
        "names": "Анна Иван Мария Пётр Ольга Сергей Елена Михаил".split(),
        "nouns": {
            "train": "река окно сад кухня рынок бутылка деревня письмо мост гора поезд яблоко книга башня".split(),
            "valid": "порт гитара дракон хижина".split(),
            "test": "лес остров пустыня статуя".split(),
        },
    },
    "hi": {
        "templates": (
            "{n1} और {n2} आज बहुत {a} हैं।",
            "{p} कहती है कि {n1} और {n2} कल {a} थे।",
            "सुबह {n1} और {n2} बिलकुल {a} थे।",
            "{n1} और {n2} इतने {a} क्यों हैं, {p} पूछता है।",
        ),
        "adjectives": "सुंदर शांत लाल सफ़ेद भारी गरम नरम".split(),
        "names": "सीता राम गीता मोहन राधा अर्जुन मीरा विजय".split(),
        "nouns": {
            "train": "नदी खिड़की बगीचा रसोई बाज़ार बोतल गाँव चिट्ठी पुल पहाड़ रेलगाड़ी सेब किताब मीनार".split(),
            "valid": "बंदरगाह गिटार अजगर झोपड़ी".split(),
            "test": "जंगल द्वीप रेगिस्तान मूर्ति".split(),
        },
    },
    "ja": {  # kana only: espeak-ng reads kana, not kanji
        "templates": (
            "きょう {n1}と {n2}は とても {a}です。",
            "{p}さんは {n1}と {n2}が {a}だと いいました。",
            "けさ {n1}と {n2}は {a}でした。",
            "どうして {n1}と {n2}は そんなに {a}なのですか。",
        ),
        "adjectives": "しずか きれい げんき ゆうめい にぎやか ふしぎ じょうぶ たいせつ".split(),  # na-adjectives
        "names": "たなか さとう すずき やまだ いとう なかむら こばやし わたなべ".split(),
        "nouns": {
            "train": "かわ まど にわ だいどころ いちば びん むら てがみ はし やま でんしゃ りんご ほん とう".split(),
            "valid": "みなと ギター りゅう こや".split(),
            "test": "もり しま さばく ぞう".split(),
        },
    },
}

# glibc locale sources for the languages without a grammar (espeak-ng language -> locale file)
LOCALES = {
    "mr": "mr_IN", "te": "te_IN", "pl": "pl_PL", "sv": "sv_SE", "da": "da_DK", "nb": "nb_NO", "tr": "tr_TR",
    "hu": "hu_HU", "ro": "ro_RO", "el": "el_GR", "sk": "sk_SK", "hr": "hr_HR", "bg": "bg_BG", "uk": "uk_UA",
    "ko": "ko_KR", "vi": "vi_VN", "id": "id_ID", "sw": "sw_KE", "cy": "cy_GB", "et": "et_EE", "lt": "lt_LT",
    "lv": "lv_LV", "sl": "sl_SI", "is": "is_IS", "ta": "ta_IN", "bn": "bn_IN", "kn": "kn_IN", "ml": "ml_IN",
    "ka": "ka_GE", "af": "af_ZA", "eu": "eu_ES", "ga": "ga_IE", "he": "he_IL", "fa": "fa_IR", "ar": "ar_EG",
}
LOCALE_DIR = "/usr/share/i18n/locales"
LICENSE_DIR = "/usr/share/common-licenses"
LICENSES = ("Apache-2.0", "GPL-3", "LGPL-2.1", "MPL-2.0", "Artistic", "GFDL-1.3", "CC0-1.0")
FESTIVAL_DOCS = {"en": "/usr/share/doc/festival/examples/intro.text", "es": "/usr/share/doc/festival/examples/spintro.text"}


@functools.lru_cache(maxsize=None)
def minimix():
    """recipes/MiniMix/generate_minimix.py, imported by path (its sentences and mixing are reused)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "MiniMix", "generate_minimix.py")
    spec = importlib.util.spec_from_file_location("generate_minimix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sentences(text, min_words=5, max_words=14):
    """Plain sentences of a prose text: 5-14 words, letters and light punctuation only."""
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = s.strip().strip('"').strip()
        words = s.split()
        if not (min_words <= len(words) <= max_words):
            continue
        if re.search(r"[0-9@<>\[\]{}/\\|_=*#&%$]|https?|www\.|\(|\)", s) or s.upper() == s:
            continue
        if not s[0].isalpha() or s[-1] not in ".!?":
            continue
        out.append(s)
    return out


def zen_sentences():
    """The 19 aphorisms of the Zen of Python (rot13 in ``this.py``), two per sentence."""
    spec = importlib.util.find_spec("this")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return []
    src = read_source(spec.origin)
    m = re.search(r's = """(.*?)"""', src, re.S)
    if not m:
        return []
    lines = [ln.strip() for ln in codecs.decode(m.group(1), "rot13").splitlines()[2:] if ln.strip()]
    lines = [ln if ln[-1] in ".!?" else ln + "." for ln in lines]
    return [f"{a} {b}" for a, b in zip(lines[::2], lines[1::2])]


def license_sentences():
    out = []
    for name in LICENSES:
        path = os.path.join(LICENSE_DIR, name)
        if os.path.isfile(path):
            out += _sentences(read_source(path))
    return list(dict.fromkeys(out))


def festival_doc_sentences(language):
    path = FESTIVAL_DOCS.get(language)
    if not path or not os.path.isfile(path):
        return []
    return list(dict.fromkeys(_sentences(read_source(path, encoding="latin-1"))))


def _locale_strings(text, key):
    m = re.search(rf"^{key}\s+((?:\"[^\"]*\";?\s*/?\s*\n?\s*)+)", text, re.M)
    if not m:
        return []
    vals = re.findall(r'"([^"]*)"', m.group(1))
    decode = lambda s: re.sub(r"<U([0-9A-Fa-f]{4,8})>", lambda u: chr(int(u.group(1), 16)), s)  # noqa: E731
    return [decode(v) for v in vals if v]


def locale_phrases(language):
    """Phrases from a glibc locale source: language, country, days and months (native script)."""
    name = LOCALES.get(language)
    path = os.path.join(LOCALE_DIR, name) if name else None
    if not path or not os.path.isfile(path):
        return []
    text = read_source(path, encoding="latin-1")
    days, months = _locale_strings(text, "day"), _locale_strings(text, "mon")
    lang, country = _locale_strings(text, "lang_name"), _locale_strings(text, "country_name")
    if len(days) != 7 or len(months) != 12:
        return []
    head = ", ".join(lang[:1] + country[:1])
    phrases = []
    for i, day in enumerate(days):
        for j in range(0, 12, 3):
            body = f"{day}, {months[j]}, {months[(j + i + 1) % 12]}, {days[(i + j + 2) % 7]}."
            phrases.append(f"{head}. {body}" if head and (i + j) % 2 == 0 else body)
    return phrases


class TextBank:
    """Draws sentences of a language for a split, from every source available for that language."""

    def __init__(self, extra_files=()):
        self._mm = minimix()
        self._corpora = {}  # (language, source) -> {split: [sentences]}
        for lang, path in extra_files:
            self._add(lang, f"file:{os.path.basename(path)}", _sentences(read_source(path)) or
                      [ln.strip() for ln in read_source(path).splitlines() if ln.strip()])
        self._add("en", "zen", zen_sentences())
        self._add("en", "license", license_sentences())
        for lang in FESTIVAL_DOCS:
            self._add(lang, "festival-doc", festival_doc_sentences(lang))
        for lang in LOCALES:
            self._add(lang, "locale", locale_phrases(lang))

    def _add(self, lang, source, sentences):
        by_split = {s: [] for s in SPLITS}
        for s in sentences:
            by_split[split_of(s)].append(s)
        if any(by_split.values()):
            self._corpora[(lang, source)] = by_split

    def languages(self):
        """Languages that have some text (grammar or corpus)."""
        return sorted({"en"} | set(GRAMMARS) | {lang for lang, _ in self._corpora})

    def sources(self, language, split):
        out = ["template"] if language == "en" or language in GRAMMARS else []
        return out + sorted(src for (lang, src), by in self._corpora.items() if lang == language and by[split])

    def draw(self, language, split, rng):
        """``(source, sentence)``: a source of the language, then a sentence of it.

        A corpus is drawn in proportion to its number of sentences in the split, a grammar as if it
        had ``TEMPLATE_WEIGHT``: small corpora (the Zen of Python's nine pairs of lines) are not
        repeated over and over.
        """
        sources = self.sources(language, split)
        if not sources:
            raise ValueError(f"no text in language {language!r} for split {split!r}")
        weights = np.array([TEMPLATE_WEIGHT if s == "template" else len(self._corpora[(language, s)][split])
                            for s in sources], dtype=float)
        source = sources[rng.choice(len(sources), p=weights / weights.sum())]
        if source != "template":
            pool = self._corpora[(language, source)][split]
            return source, pool[rng.integers(len(pool))]
        if language == "en":
            return source, self._mm.make_sentences(MINIMIX_SPLIT[split], 1, rng)[0]
        g = GRAMMARS[language]
        nouns = g["nouns"][split]
        i, j = rng.choice(len(nouns), size=2, replace=False)
        tpl = g["templates"][rng.integers(len(g["templates"]))]
        text = tpl.format(
            n1=nouns[i], n2=nouns[j], a=g["adjectives"][rng.integers(len(g["adjectives"]))],
            p=g["names"][rng.integers(len(g["names"]))],
        )
        return source, text[0].upper() + text[1:]
