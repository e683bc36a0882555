"""Task instructions for mE5-large-instruct / E5-mistral, and which texts of a task get them.

An instruct model embeds a query as `Instruct: {task}\\nQuery: {q}` (`tokenize.instruct_query`); the
instruction must be the one the model saw for that kind of task, so evaluation uses the published table:
- per MTEB task, `TASK_INSTRUCTIONS` is `get_task_def_by_task_name_and_type` of microsoft/unilm
  `e5/utils.py` (commit 9c0f1ff7ca53431fe47d2637dfe253643d94185b), the code that produced the mE5 and
  E5-mistral MTEB numbers (E5-mistral, arXiv 2401.00368, Table 15), copied verbatim with its alias rules;
- per task type, `TYPE_INSTRUCTIONS`: STS, Summarization and BitextMining are unilm's own (it uses one
  instruction for every task of these types); the other defaults are ours, for tasks outside the table;
- per training source, `SOURCE_INSTRUCTIONS` (for data_pipelines' `PreprocessConfig.instructions`): the
  public fine-tuning sets use E5-mistral Table 14; stage-1 sources never had instructions, ours describe
  the pair type.

Which texts get the prefix follows the same evaluation code: for Retrieval the instruction (or "query: ")
goes on queries and documents get nothing in instruct mode ("passage: " otherwise), except where unilm
embeds the corpus as queries (QuoraRetrieval); every other task type (STS, classification, clustering,
bitext, pair classification, reranking, summarization) puts the same prefix on every text.
"""
from __future__ import annotations

from typing import Sequence

from me5_jax.tokenize import PASSAGE_PREFIX, QUERY_PREFIX, instruct_query, with_prefix

RETRIEVAL = "Retrieval"
_WEB_SEARCH = "Given a web search query, retrieve relevant passages that answer the query"
_WIKI_QA = "Given a question, retrieve Wikipedia passages that answer the question"
_ZH_SEARCH = "Given a Chinese search query, retrieve web passages that answer the question"
_ZH_MED_QA = "Given a Chinese community medical question, retrieve replies that best answer the question"
_SIMILAR = "Retrieve semantically similar text."
_PARALLEL = "Retrieve parallel sentences."

TYPE_INSTRUCTIONS = {
    "STS": _SIMILAR,                                                                        # unilm
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",  # unilm
    "BitextMining": _PARALLEL,                                                              # unilm
    RETRIEVAL: _WEB_SEARCH,                                      # ours (unilm's MSMARCO instruction)
    "Reranking": "Given a query, retrieve documents that answer the query",                 # ours
    "PairClassification": _SIMILAR,                              # ours (unilm's Ocnli/Cmnli instruction)
    "Classification": "Classify the given text into its appropriate category",              # ours
    "Clustering": "Identify the topic or theme of the given texts",                         # ours
}
# Types unilm maps to one instruction whatever the task name.
_ONE_PER_TYPE = ("STS", "Summarization", "BitextMining")

TASK_INSTRUCTIONS = {
    # Classification
    "AmazonCounterfactualClassification":
        "Classify a given Amazon customer review text as either counterfactual or not-counterfactual",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six "
                             "emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification":
        "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    "TNews": "Classify the fine-grained category of the given news title",
    "IFlyTek": "Given an App description text, find the appropriate fine-grained category",
    "MultilingualSentiment": "Classify sentiment of the customer review into positive, neutral, or negative",
    "JDReview": "Classify the customer review for iPhone on e-commerce platform into positive or negative",
    "OnlineShopping": "Classify the customer review for online shopping into positive or negative",
    "Waimai": "Classify the customer review from a food takeaway platform into positive or negative",
    # Clustering
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    "CLSClusteringS2S": "Identify the main category of scholar papers based on the titles",
    "CLSClusteringP2P": "Identify the main category of scholar papers based on the titles and abstracts",
    "ThuNewsClusteringS2S": "Identify the topic or theme of the given news articles based on the titles",
    "ThuNewsClusteringP2P": "Identify the topic or theme of the given news articles based on the titles and contents",
    # Reranking and PairClassification
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    "T2Reranking": _ZH_SEARCH,
    "MMarcoReranking": _ZH_SEARCH,
    "CMedQAv1": _ZH_MED_QA,
    "CMedQAv2": _ZH_MED_QA,
    "Ocnli": _SIMILAR,
    "Cmnli": _SIMILAR,
    # Retrieval
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": _WEB_SEARCH,
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": _WIKI_QA,
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    "T2Retrieval": _ZH_SEARCH,
    "MMarcoRetrieval": _WEB_SEARCH,
    "DuRetrieval": _ZH_SEARCH,
    "CovidRetrieval": "Given a question on COVID-19, retrieve news articles that answer the question",
    "CmedqaRetrieval": _ZH_MED_QA,
    "EcomRetrieval":
        "Given a user query from an e-commerce website, retrieve description sentences of relevant products",
    "MedicalRetrieval": "Given a medical question, retrieve user replies that best answer the question",
    "VideoRetrieval": "Given a video search query, retrieve the titles of relevant videos",
    "miracl": _WIKI_QA,
}
# unilm's extra Retrieval names: BEIR folder names, and every CQADupStack subforum.
_RETRIEVAL_ALIASES = {"trec-covid": "TRECCOVID", "climate-fever": "ClimateFEVER", "dbpedia-entity": "DBPedia",
                      "webis-touche2020": "Touche2020", "fiqa": "FiQA2018", "quora": "QuoraRetrieval"}
_CQADUPSTACK = ("Given a question, retrieve detailed question descriptions from Stackexchange that are "
                "duplicates to the given question")
# Retrieval tasks whose corpus unilm embeds as queries (mteb_beir_eval.py --doc-as-query).
DOC_AS_QUERY = ("QuoraRetrieval", "quora")

# Training instruction per data_pipelines source (PreprocessConfig.instructions) and per public stage-2 set
# (E5-mistral Table 14; where it lists two, the first). A record's own "task" overrides these.
SOURCE_INSTRUCTIONS = {
    # stage-1 sources (data_pipelines.source.DATASETS): ours, one per pair type of report Table 1
    "wikipedia": "Given a Wikipedia section title, retrieve the passage of that section",
    "mc4": "Given the title of a web page, retrieve the page content",
    "cc_news": "Given a news title, retrieve the news article",
    "nllb": _PARALLEL,
    "reddit": "Given a Reddit comment, retrieve a response to it",
    "s2orc": "Given a scientific paper title, retrieve the abstract of the paper",
    "stackexchange": "Given a question from StackExchange, retrieve its answer",
    "xp3": "Given an instruction or prompt, retrieve a response to it",
    "sbert": _SIMILAR,
    "custom": _WEB_SEARCH,
    "stage2": _WEB_SEARCH,
    "bible": _PARALLEL,
    "bible/demo": _PARALLEL,
    # public fine-tuning sets, E5-mistral Table 14
    "eli5": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "miracl": _WIKI_QA,
    "mrtydi": _WIKI_QA,
    "nq": _WIKI_QA,
    "squad": "Retrieve Wikipedia passages that answer the question",
    "triviaqa": "Retrieve Wikipedia passages that answer the question",
    "nli": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "msmarco_passage": _WEB_SEARCH,
    "msmarco_document": "Given a web search query, retrieve relevant documents that answer the query",
    "quora": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "dureader": _ZH_SEARCH,
    "t2ranking": _ZH_SEARCH,
}


def _check_type(task_type: str) -> None:
  if task_type not in TYPE_INSTRUCTIONS:
    raise ValueError(f"no instructions for task type {task_type!r}; known: {', '.join(TYPE_INSTRUCTIONS)}")


def _table_entry(task_name: str, task_type: str) -> str | None:
  if task_name in TASK_INSTRUCTIONS:
    return TASK_INSTRUCTIONS[task_name]
  if task_type != RETRIEVAL:
    return None
  if task_name.lower().startswith("cqadupstack"):
    return _CQADUPSTACK
  lower = {k.lower(): v for k, v in TASK_INSTRUCTIONS.items()}
  return lower.get(task_name.lower()) or TASK_INSTRUCTIONS.get(_RETRIEVAL_ALIASES.get(task_name, ""))


def instruction_for(task_name: str, task_type: str, strict: bool = False) -> str:
  """The instruction mE5-large-instruct is evaluated with on `task_name` (an MTEB name, or a BEIR folder
  name for Retrieval) of `task_type` (an MTEB type). Unlisted tasks get their type's default, or with
  strict=True raise ValueError: what a user who named a task explicitly wants instead of a silent default."""
  _check_type(task_type)
  if task_type in _ONE_PER_TYPE:
    return TYPE_INSTRUCTIONS[task_type]
  found = _table_entry(task_name, task_type)
  if found is None and strict:
    raise ValueError(f"no instruction for {task_type} task {task_name!r}: pass the instruction itself, or a "
                     f"task named in me5_jax.instructions.TASK_INSTRUCTIONS")
  return found or TYPE_INSTRUCTIONS[task_type]


def instruct_prefix(instruction: str) -> str:
  """`Instruct: {task}\\nQuery: ` as a plain prefix, for code that takes one (Embedder.encode)."""
  return instruct_query(instruction, "")


def is_symmetric(task_type: str, task_name: str = "") -> bool:
  """Whether every text of the task gets the query-side prefix: all types but the retrieval ones
  (Retrieval, and mteb 2's InstructionRetrieval, Any2AnyRetrieval...), as unilm does."""
  return not task_type.endswith(RETRIEVAL) or task_name in DOC_AS_QUERY


def prefixes(task_type: str, task_name: str = "", instruction: str | None = None) -> tuple[str, str]:
  """(query-side prefix, document-side prefix) for a task: E5 "query: "/"passage: " without an
  instruction; with one, the instruct prefix on queries and nothing on documents. Symmetric tasks
  (`is_symmetric`) get the query-side prefix on both sides."""
  query = QUERY_PREFIX if instruction is None else instruct_prefix(instruction)
  if is_symmetric(task_type, task_name):
    return query, query
  return query, (PASSAGE_PREFIX if instruction is None else "")


def format_texts(texts: Sequence[str], task_type: str, side: str, task_name: str = "",
                 instruction: str | None = None) -> list[str]:
  """Texts of one side ("query" or "document") of a task, prefixed as `prefixes` says."""
  if side not in ("query", "document"):
    raise ValueError(f"side must be 'query' or 'document', got {side!r}")
  query, document = prefixes(task_type, task_name, instruction)
  return with_prefix(texts, query if side == "query" else document)
