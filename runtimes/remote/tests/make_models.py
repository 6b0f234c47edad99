"""Trains the remote runtime tests' models and writes what the Python models answer.

Usage: make_models.py OUT_DIR (run with .venv-mlserver's python, the scikit-learn and xgboost MLServer
runs). Writes OUT_DIR/sklearn.joblib (a logistic regression), OUT_DIR/xgboost.json (a gradient-boosted
regressor) and OUT_DIR/expected.json: the inputs the tests send and each model's predictions for them.
"""

import json
import sys

import joblib
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

    query = x[:5]
    expected = {
        "input": query.tolist(),
        "sklearn_predict": classifier.predict(query).tolist(),
        "sklearn_predict_proba": classifier.predict_proba(query).tolist(),
        "xgboost_predict": regressor.predict(query.astype(np.float32)).tolist(),
    }
    with open(f"{out}/expected.json", "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main(sys.argv[1])
