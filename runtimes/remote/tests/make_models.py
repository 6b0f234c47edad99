"""Trains the remote runtime tests' models and writes what the Python models answer.

Usage: make_models.py OUT_DIR (run with .venv-mlserver's python, the scikit-learn, xgboost and lightgbm
MLServer runs). Writes OUT_DIR/sklearn.joblib (a logistic regression), OUT_DIR/xgboost.json (a
gradient-boosted regressor), OUT_DIR/lightgbm/model.txt (a gradient-boosted binary classifier in
LightGBM's text format) and OUT_DIR/expected.json: the inputs the tests send and each model's
predictions for them.
"""

import json
import sys
from pathlib import Path

import joblib
import lightgbm as lgb
import numpy as np
import xgboost as xgb
from sklearn.linear_model import LogisticRegression


def main(out: str) -> None:
    rng = np.random.RandomState(0)
    x = rng.rand(64, 4)
    classes = (x[:, 0] + x[:, 1] > 1.0).astype(np.int64)
    classifier = LogisticRegression().fit(x, classes)
    joblib.dump(classifier, f"{out}/sklearn.joblib")

    x32 = x.astype(np.float32)
    regressor = xgb.XGBRegressor(n_estimators=8, max_depth=3).fit(x32, x32 @ np.float32([1, 2, 3, 4]))
    regressor.save_model(f"{out}/xgboost.json")

    # Enough rows for LightGBM's default minimum leaf size to allow real splits.
    x_lgb = rng.rand(400, 4)
    y_lgb = (x_lgb[:, 0] * 2 + x_lgb[:, 2] > 1.4).astype(np.int64)
    params = {"objective": "binary", "num_leaves": 7, "learning_rate": 0.3, "verbose": -1, "seed": 0,
              "deterministic": True, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x_lgb, y_lgb), num_boost_round=10)
    Path(f"{out}/lightgbm").mkdir(exist_ok=True)
    booster.save_model(f"{out}/lightgbm/model.txt")

    query = x[:5]
    expected = {
        "input": query.tolist(),
        "sklearn_predict": classifier.predict(query).tolist(),
        "sklearn_predict_proba": classifier.predict_proba(query).tolist(),
        "xgboost_predict": regressor.predict(query.astype(np.float32)).tolist(),
        # The probability of class 1, what Booster.predict answers for a binary objective.
        "lightgbm_predict": booster.predict(query).tolist(),
    }
    with open(f"{out}/expected.json", "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main(sys.argv[1])
