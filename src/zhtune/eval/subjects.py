"""The subjects of C-Eval, CMMLU and MMLU and the category each belongs to, as the benchmarks publish them
(C-Eval's subject_mapping.json, CMMLU's src/categories.py, MMLU's categories.py). Data only.

    from zhtune.eval.subjects import BENCHMARKS
    BENCHMARKS["ceval"]["law"]   # -> ("法学", "Humanities")
"""

from __future__ import annotations

STEM, HUMANITIES, SOCIAL, OTHER = "STEM", "Humanities", "Social Science", "Other"
CATEGORIES = (STEM, SOCIAL, HUMANITIES, OTHER)


def _table(rows: str, category_of: dict[str, str]) -> dict[str, tuple[str, str]]:
    """'subject 中文名 category-key' lines -> {subject: (Chinese name, category)}."""
    out = {}
    for line in rows.strip().splitlines():
        subject, name, key = line.split()
        out[subject] = (name, category_of[key])
    return out


_KEYS = {"stem": STEM, "hum": HUMANITIES, "soc": SOCIAL, "oth": OTHER}

# C-Eval: 52 subjects (clinical_medicine has no category in the official file; C-Eval's leaderboard counts it as Other)
CEVAL = _table("""
computer_network 计算机网络 stem
operating_system 操作系统 stem
computer_architecture 计算机组成 stem
college_programming 大学编程 stem
college_physics 大学物理 stem
college_chemistry 大学化学 stem
advanced_mathematics 高等数学 stem
probability_and_statistics 概率统计 stem
discrete_mathematics 离散数学 stem
electrical_engineer 注册电气工程师 stem
metrology_engineer 注册计量师 stem
high_school_mathematics 高中数学 stem
high_school_physics 高中物理 stem
high_school_chemistry 高中化学 stem
high_school_biology 高中生物 stem
middle_school_mathematics 初中数学 stem
middle_school_biology 初中生物 stem
middle_school_physics 初中物理 stem
middle_school_chemistry 初中化学 stem
veterinary_medicine 兽医学 stem
college_economics 大学经济学 soc
business_administration 工商管理 soc
marxism 马克思主义基本原理 soc
mao_zedong_thought 毛泽东思想和中国特色社会主义理论体系概论 soc
education_science 教育学 soc
teacher_qualification 教师资格 soc
high_school_politics 高中政治 soc
high_school_geography 高中地理 soc
middle_school_politics 初中政治 soc
middle_school_geography 初中地理 soc
modern_chinese_history 近代史纲要 hum
ideological_and_moral_cultivation 思想道德修养与法律基础 hum
logic 逻辑学 hum
law 法学 hum
chinese_language_and_literature 中国语言文学 hum
art_studies 艺术学 hum
professional_tour_guide 导游资格 hum
legal_professional 法律职业资格 hum
high_school_chinese 高中语文 hum
high_school_history 高中历史 hum
middle_school_history 初中历史 hum
civil_servant 公务员 oth
sports_science 体育学 oth
plant_protection 植物保护 oth
basic_medicine 基础医学 oth
clinical_medicine 临床医学 oth
urban_and_rural_planner 注册城乡规划师 oth
accountant 注册会计师 oth
fire_engineer 注册消防工程师 oth
environmental_impact_assessment_engineer 环境影响评价工程师 oth
tax_accountant 税务师 oth
physician 医师资格 oth
""", _KEYS)

# CMMLU: 67 subjects; the category is that of the subject's first subcategory in CMMLU's categories.py
# (its "China specific" group overlaps the four and is listed in CMMLU_CHINA_SPECIFIC)
CMMLU = _table("""
agronomy 农学 oth
anatomy 解剖学 stem
ancient_chinese 古汉语 soc
arts 艺术学 hum
astronomy 天文学 stem
business_ethics 商业伦理 soc
chinese_civil_service_exam 中国公务员考试 soc
chinese_driving_rule 中国驾驶规则 oth
chinese_food_culture 中国饮食文化 soc
chinese_foreign_policy 中国外交政策 soc
chinese_history 中国历史 hum
chinese_literature 中国文学 hum
chinese_teacher_qualification 中国教师资格 soc
clinical_knowledge 临床知识 oth
college_actuarial_science 大学精算学 stem
college_education 大学教育学 soc
college_engineering_hydrology 大学工程水文学 stem
college_law 大学法律 hum
college_mathematics 大学数学 stem
college_medical_statistics 大学医学统计 stem
college_medicine 大学医学 oth
computer_science 计算机科学 stem
computer_security 计算机安全 oth
conceptual_physics 概念物理学 stem
construction_project_management 建设工程管理 oth
economics 经济学 soc
education 教育学 soc
electrical_engineering 电气工程 stem
elementary_chinese 小学语文 soc
elementary_commonsense 小学常识 oth
elementary_information_and_technology 小学信息技术 oth
elementary_mathematics 初等数学 stem
ethnology 民族学 soc
food_science 食品科学 oth
genetics 遗传学 stem
global_facts 全球事实 hum
high_school_biology 高中生物 stem
high_school_chemistry 高中化学 stem
high_school_geography 高中地理 soc
high_school_mathematics 高中数学 stem
high_school_physics 高中物理学 stem
high_school_politics 高中政治 soc
human_sexuality 人类性行为 oth
international_law 国际法学 hum
journalism 新闻学 soc
jurisprudence 法理学 hum
legal_and_moral_basis 法律与道德基础 oth
logical 逻辑学 hum
machine_learning 机器学习 stem
management 管理学 soc
marketing 市场营销 soc
marxist_theory 马克思主义理论 hum
modern_chinese 现代汉语 soc
nutrition 营养学 oth
philosophy 哲学 hum
professional_accounting 专业会计 soc
professional_law 专业法学 hum
professional_medicine 专业医学 oth
professional_psychology 专业心理学 soc
public_relations 公共关系 soc
security_study 安全研究 soc
sociology 社会学 soc
sports_science 体育学 oth
traditional_chinese_medicine 中医中药 oth
virology 病毒学 stem
world_history 世界历史 hum
world_religions 世界宗教 hum
""", _KEYS)
CMMLU_CHINA_SPECIFIC = frozenset("""
ancient_chinese chinese_civil_service_exam chinese_driving_rule chinese_food_culture chinese_foreign_policy
chinese_history chinese_literature chinese_teacher_qualification construction_project_management elementary_chinese
elementary_commonsense ethnology high_school_politics modern_chinese traditional_chinese_medicine
""".split())

# MMLU: 57 subjects (English names; the "Chinese name" column is the subject's English title)
_MMLU = {
    STEM: """abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science
             college_mathematics college_physics computer_security conceptual_physics electrical_engineering
             elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
             high_school_mathematics high_school_physics high_school_statistics machine_learning""",
    HUMANITIES: """formal_logic high_school_european_history high_school_us_history high_school_world_history
                   international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy
                   prehistory professional_law world_religions""",
    SOCIAL: """econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics
               high_school_microeconomics high_school_psychology human_sexuality professional_psychology
               public_relations security_studies sociology us_foreign_policy""",
    OTHER: """business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing
              medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology""",
}
MMLU = {s: (s.replace("_", " "), cat) for cat, names in _MMLU.items() for s in names.split()}

BENCHMARKS: dict[str, dict[str, tuple[str, str]]] = {"ceval": CEVAL, "cmmlu": CMMLU, "mmlu": MMLU}
