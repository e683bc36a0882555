"""Shared test sentences: 36 short texts in 12 languages and scripts, an empty string, and one long text.

Written for these tests (no third-party text). The long text exceeds 256 MiniLM tokens and 512 XLM-R
tokens, so truncation is exercised by every model's default max length.
"""

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "That is a happy person",
    "That is a very happy person",
    "How many people live in Berlin?",
    "Der Zug nach München fährt um halb neun vom Gleis drei ab.",
    "Ich habe meinen Regenschirm im Büro vergessen.",
    "Wie spät ist es?",
    "Le marché ouvre tôt le samedi matin, même en hiver.",
    "Où se trouve la bibliothèque municipale ?",
    "Elle a appris le piano pendant dix ans.",
    "¿Cuántos idiomas se hablan en España?",
    "El río crece cada primavera cuando se derrite la nieve.",
    "Mañana vamos a la playa si no llueve.",
    "Москва — столица России.",
    "Кошка спит на подоконнике весь день.",
    "Я люблю читать книги по вечерам.",
    "我今天早上喝了一杯绿茶。",
    "北京是中国的首都。",
    "图书馆星期一不开门。",
    "القاهرة هي عاصمة مصر.",
    "أحب قراءة الكتب في المساء.",
    "東京は日本の首都です。",
    "猫が窓辺で寝ています。",
    "मुझे सुबह चाय पीना पसंद है।",
    "दिल्ली भारत की राजधानी है।",
    "서울은 한국의 수도입니다.",
    "오늘 날씨가 정말 좋네요.",
    "Sungura alikimbia haraka msituni.",
    "Istanbul, Boğaz'ın iki yakasına yayılmış bir şehirdir.",
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "Việt Nam có nhiều món ăn ngon.",
    "Ang pusa ay natutulog sa ilalim ng mesa.",
    "E=mc^2 and 3.14159 are famous; so is https://example.org/a?b=c.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines inside",
    "",
]

LONG_TEXT = " ".join(
    f"Paragraph {i}: the committee met again to discuss the budget, the schedule, and the many "
    f"small details that nobody had planned for; Der Ausschuss tagte erneut, и снова ничего не решил."
    for i in range(20))

TEXTS = SENTENCES + [LONG_TEXT]
