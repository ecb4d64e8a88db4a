#!/bin/sh
# The `minio-init` service: buckets and least-privilege keys. The root login stays here and in MinIO;
# the MLflow server gets a key for the MLflow bucket only, the worker (DVC) one for the DVC bucket
# only, and the app none (it reads models through the MLflow server). Safe to run again.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MLFLOW_BUCKET:?}" "${DVC_BUCKET:?}"
: "${MLFLOW_S3_ACCESS_KEY:?}" "${MLFLOW_S3_SECRET_KEY:?}" "${DVC_S3_ACCESS_KEY:?}" "${DVC_S3_SECRET_KEY:?}"
work="${TMPDIR:-/tmp}"

mc alias set local "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb -p "local/$MLFLOW_BUCKET" "local/$DVC_BUCKET"

# grant ACCESS_KEY SECRET_KEY BUCKET: a user that can list, read, write and delete in BUCKET alone.
grant() {
    policy="sftflow-$3-readwrite"
    cat >"$work/$policy.json" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$3"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                                   "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$3/*"]}
  ]
}
EOF
    mc admin policy create local "$policy" "$work/$policy.json"
    mc admin user add local "$1" "$2" >/dev/null
    # attach fails when the policy is attached already (a second run): that is the state we want.
    mc admin policy attach local "$policy" --user "$1" >/dev/null 2>&1 \
        || mc admin user info local "$1" | grep -q "$policy"
    echo "minio-init: $1 may use bucket $3 only"
}

grant "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY" "$MLFLOW_BUCKET"
grant "$DVC_S3_ACCESS_KEY" "$DVC_S3_SECRET_KEY" "$DVC_BUCKET"
